"""The engine host's settings for vLLM on a CPU (maye_pl/rollout/vllm_host.py).

Proves: after the host's ``_use_torch_gemm_for_linear_layers`` (run in every CPU host before its
engine starts), vLLM's CPU dispatcher builds a linear layer without a oneDNN matmul handler (whose
per-token-count kernel caches grew the engine's memory over long runs, issue 22) and the layer
still computes x @ W^T. The engine's memory over a run is measured by ``scripts/soak.py``.
"""

import pytest
import torch

from maye_pl.rollout import vllm_host


@pytest.mark.vllm
def test_a_cpu_host_has_vllm_linear_layers_use_torch_gemm(monkeypatch):
    import vllm._custom_ops as vllm_ops
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    assert vllm_ops._supports_onednn, "this vLLM build has no oneDNN GEMM: nothing to check"  # noqa: SLF001
    monkeypatch.setattr(vllm_ops, "_supports_onednn", True)  # restored after the test

    def no_onednn_handler(*args, **kwargs):
        raise AssertionError("vLLM built a oneDNN matmul handler")

    monkeypatch.setattr(vllm_ops, "create_onednn_mm", no_onednn_handler)
    vllm_host._use_torch_gemm_for_linear_layers()  # noqa: SLF001

    layer = torch.nn.Linear(64, 32, bias=False)  # float32, as the demo's engine
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    x = torch.randn(5, 64)
    weight = layer.weight.detach().clone()
    torch.testing.assert_close(layer.cpu_linear(x, weight, None), x @ weight.T)
