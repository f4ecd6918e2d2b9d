"""The backend table: ``reference``, ``cpu``, ``triton``, ``cuda``.

``auto`` (the default, or ``FASTPEFT_BACKEND=auto``) picks, per call, the first available backend that supports
the call's device and weight: ``triton`` then ``cuda`` for CUDA tensors (the Triton backend's dense ops measure the
cuda backend's kernels as their ``cuda_kernels`` route), ``cpu`` for CPU tensors (and ``triton`` on CPU tensors only
under ``TRITON_INTERPRET=1`` when forced), ``reference`` everywhere else. Within a backend each op runs by the route
measured fastest for its shape (``fastpeft.routing``).
``set_backend(name)`` forces one; asking for an unavailable backend raises with the reason.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Optional

import torch

from .. import _env, guards
from .base import Backend
from .reference_backend import ReferenceBackend

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
_MODULES = {"cpu": ".cpu", "triton": ".triton", "cuda": ".cuda"}
_instances: dict[str, Backend] = {"reference": ReferenceBackend()}
_load_errors: dict[str, str] = {}
_this_module = sys.modules[__name__]
_forced: Optional[str] = None
# Availability does not change within a process, except Triton's, which depends on TRITON_INTERPRET: cached per
# (name, that variable), because get_backend asks on every call.
_availability_cache: dict[tuple[str, Optional[str]], tuple[bool, str]] = {}
_warned_fallback: set[tuple[str, str]] = set()


def _instance(name: str) -> Optional[Backend]:
    """The backend object, importing its module lazily; None (with the reason kept) if the module fails."""
    if name in _instances:
        return _instances[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name], __name__)
        _instances[name] = module.BACKEND
    except Exception as exc:  # an optional dependency is missing or broken: report, never fail import
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    return _instances[name]


def availability(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for one backend name."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"fastpeft: unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
    # Only Triton's availability depends on TRITON_INTERPRET; the others skip the environment read (hot path).
    key = (name, _env.read("TRITON_INTERPRET") if name == "triton" else None)
    if key not in _availability_cache:
        _availability_cache[key] = _check_availability(name)
    return _availability_cache[key]


def _check_availability(name: str) -> tuple[bool, str]:
    backend = _instance(name)
    if backend is None:
        return False, f"could not be loaded ({_load_errors[name]})"
    try:
        return backend.availability()
    except Exception as exc:
        return False, f"availability check failed ({type(exc).__name__}: {exc})"


def backend_info() -> dict[str, dict]:
    """Which backends are available here, and why not: ``{name: {"available": bool, "reason": str}}``, plus
    ``"selected"``: the forced name or ``"auto"``, and ``"auto"``: ``{"cpu": name, "cuda": name}``, the backend
    ``auto`` picks first for tensors on that device (a backend may still decline a call it does not support, e.g.
    an unsupported dtype, which then goes to the next one and finally to ``reference``)."""
    info: dict[str, dict] = {}
    for name in BACKEND_NAMES:
        ok, reason = availability(name)
        info[name] = {"available": ok, "reason": reason}
    info["selected"] = _selected_name()  # type: ignore[assignment]
    auto = {}
    for device, order in (("cpu", ("cpu",)), ("cuda", ("triton", "cuda"))):
        if device == "cuda" and not torch.cuda.is_available():
            auto[device] = "none: no CUDA device"
            continue
        auto[device] = next((name for name in order if info[name]["available"]), "reference")
    info["auto"] = auto
    return info


def selection_state() -> tuple:
    """What the backend ``get_backend`` picks depends on besides the call's tensors (``set_backend`` and
    ``FASTPEFT_BACKEND``), for comparing with an earlier value."""
    return _forced, _env.raw(b"FASTPEFT_BACKEND")


def selection_guards() -> Optional[list]:
    """:func:`selection_state` as guards (``fastpeft.guards``) on its values now; None where the environment is not
    a dict a guard can read (``fastpeft._env``)."""
    environment = _env.raw_guard(b"FASTPEFT_BACKEND")
    return None if environment is None else [(guards.ATTR_IS, _this_module, "_forced", _forced), environment]


def _selected_name() -> str:
    if _forced:
        return _forced
    raw = _env.read("FASTPEFT_BACKEND")
    return (raw.strip().lower() or "auto") if raw else "auto"


def set_backend(name: Optional[str]) -> None:
    """Force a backend by name (``auto`` or None restores automatic choice). Raises ``RuntimeError`` with the
    reason if the backend is unavailable here."""
    global _forced
    if name is None or name == "auto":
        _forced = None
        return
    ok, reason = availability(name)
    if not ok:
        raise RuntimeError(f"fastpeft: backend {name!r} is not available: {reason}")
    _forced = name


def get_backend(x, weight) -> Backend:
    """The backend that serves a call with input ``x`` and base ``weight``."""
    name = _selected_name()
    if name != "auto":
        ok, reason = availability(name)
        if not ok:
            raise RuntimeError(
                f"fastpeft: backend {name!r} (from FASTPEFT_BACKEND/set_backend) is not available: {reason}"
            )
        backend = _instances[name]
        if backend.supports(x, weight):
            return backend
        key = (name, f"{x.device.type}/{x.dtype}/{type(weight).__name__}")
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            warnings.warn(
                f"fastpeft: backend {name!r} does not serve {key[1]} inputs; using the reference backend for them",
                stacklevel=3,
            )
        return _instances["reference"]
    if x.is_cpu:  # the common case, without building the candidate order
        cpu = _instances.get("cpu")
        if cpu is not None and availability("cpu")[0] and cpu.supports(x, weight):
            return cpu
    # On a GPU the Triton backend comes first: its ops measure the cuda backend's kernels as one of their routes.
    order = ("triton", "cuda") if x.device.type == "cuda" else ("cpu",)
    for candidate in order:
        if availability(candidate)[0] and _instances[candidate].supports(x, weight):
            return _instances[candidate]
    return _instances["reference"]
