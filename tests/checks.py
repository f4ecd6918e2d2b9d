"""The tests' comparison helpers, in one place: the relative error, a named closeness check, and the 2x rule for
low precision (flash-attention's: at most twice as far from an fp32/fp64 oracle as the reference run in the same
low precision)."""

from __future__ import annotations

import os

import pytest
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ``||a - e|| / ||e||`` in float64 on the CPU (the absolute one when ``e`` is zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Named relative-error check: the message says which tensor and by how much."""
    assert actual is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def assert_within_2x(name: str, actual, low_precision_ref, fp32_ref, floor: float = 1e-6) -> None:
    """fastpeft may be at most 2x as far from the fp32 (or fp64) reference as the reference implementation run in
    the same low precision, plus a small floor for cases where both are exact."""
    assert actual.shape == fp32_ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(fp32_ref.shape)}"
    err = rel_err(actual, fp32_ref)
    ref_err = rel_err(low_precision_ref, fp32_ref)
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e} + {floor:.0e}"


def assert_by_dtype_rule(name: str, got, want, oracle, ref_same_dtype=None, all_fp32: bool = True) -> None:
    """All inputs fp32: ``got`` within 1e-5 of ``want``. Any low-precision input (even when this output is fp32, e.g.
    y under bf16 adapters): the 2x rule against the fp32 ``oracle``, the reference's own error being that of
    ``ref_same_dtype`` (default ``want``)."""
    assert got is not None, f"{name}: missing"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    if all_fp32:
        assert_close(name, got, want, 1e-5)
    else:
        assert_within_2x(name, got, ref_same_dtype if ref_same_dtype is not None else want, oracle)


class CallCounter:
    """Counts the calls of ``getattr(owner, name)``, replaced through ``monkeypatch`` by a counting wrapper (to prove
    which path a call took)."""

    def __init__(self, monkeypatch, owner, name: str):
        self.calls = 0
        wrapped = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return wrapped(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


class FusedCallCounter:
    """Counts the fused LoRA calls: those of the full path (``functional.lora_linear``) and those a settled training
    call served (``functional.SettledTrainingCall.output`` returning an output, or raising inside), so a test knows
    fastpeft's forward (not PEFT's fallback) ran."""

    def __init__(self, monkeypatch):
        from fastpeft import functional

        self.full = CallCounter(monkeypatch, functional, "lora_linear")
        self.settled = 0
        serve = functional.SettledTrainingCall.output

        def counted(call, x):
            try:
                y = serve(call, x)
            except BaseException:  # served, and stopped inside (e.g. a checkpoint's recompute stopping early)
                self.settled += 1
                raise
            self.settled += y is not None
            return y

        monkeypatch.setattr(functional.SettledTrainingCall, "output", counted)

    @property
    def calls(self) -> int:
        return self.full.calls + self.settled


def require_triton_mode_for(device: str) -> None:
    """Skip unless this session's Triton mode runs Triton kernels on ``device``'s tensors: CPU tensors only in the
    interpreter, CUDA tensors only compiled. conftest fixes the mode once, before Triton is imported (the interpreter
    where there is no CUDA device): ``@triton.jit`` and Triton's own library functions take the mode when they are
    decorated, so a process cannot switch between the two."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device == "cpu":
        if not interpreting:
            pytest.skip("CPU tensors run only in Triton's interpreter; this session compiles (a CUDA device is here)")
    elif not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none here)")
    elif interpreting:
        pytest.skip("this session runs Triton's interpreter (TRITON_INTERPRET=1); CUDA kernels are checked compiled")
