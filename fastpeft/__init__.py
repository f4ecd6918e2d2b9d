"""fastpeft: fused LoRA, QLoRA and IA3 kernels behind Hugging Face PEFT's API.

``import fastpeft`` works with no GPU, no Triton and no compiled extension; missing pieces are reported by
``backend_info()`` and raised, with the reason, only when asked for.
"""

from .backends import backend_info, set_backend

__version__ = "0.1.0"
__all__ = ["backend_info", "set_backend", "__version__"]
