"""maye_pl: Reinforce++ for vision-language models on PyTorch Lightning."""

from maye_pl import _torchvision_shim

# Before anything imports torchvision (lightning, transformers' Qwen2-VL processor, vLLM).
_torchvision_shim.apply()

__version__ = "0.1.0"
