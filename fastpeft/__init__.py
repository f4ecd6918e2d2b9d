"""fastpeft: fused LoRA, QLoRA and IA3 kernels behind Hugging Face PEFT's API.

``import fastpeft`` works with no GPU, no Triton and no compiled extension; missing pieces are reported by
``backend_info()`` and raised, with the reason, only when asked for.

Public API: ``patch``, ``accelerate``, ``register``, ``save_pretrained``, ``load_adapter``, ``set_backend``,
``backend_info``, ``routes`` (the measured route choices of this process), ``set_route``, ``report`` (which adapter
layers run fused, by which backend and routes, and why not); the functional ops are in
``fastpeft.functional``, the route table in ``fastpeft.routing``.
"""

from .backends import backend_info, set_backend
from .functional import ia3_linear, lora_linear
from .io import load_adapter, save_pretrained
from .patching import accelerate, patch, register
from .report import report
from .routing import routes, set_route

__version__ = "0.1.0"
__all__ = [
    "accelerate",
    "backend_info",
    "ia3_linear",
    "load_adapter",
    "lora_linear",
    "patch",
    "register",
    "report",
    "routes",
    "save_pretrained",
    "set_backend",
    "set_route",
    "__version__",
]
