"""The PEFT parity suite again, with each backend forced through FASTPEFT_BACKEND, in a fresh process, and the
``cpu`` backend once more on each SIMD path this CPU can run besides the one cpuid picks (FASTPEFT_CPU_ISA), and
once as the AVX2 kind runs it, without oneDNN's bf16 block kernel (ONEDNN_MAX_CPU_ISA=AVX2).

A fresh process is needed because ``TRITON_INTERPRET`` must be set before Triton is imported. The transformer
families are left to the default run (they exercise the module layer, not the backend); the MLP, Conv1D,
multi-adapter, IA3, low-precision and dropout cases run here through every backend that is available.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import pytest

import fastpeft

HERE = os.path.dirname(os.path.abspath(__file__))
SUBSET = "not transformers and not patch_targets and not save_then"


def _available(name):
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return False, f"triton is not importable: {exc}"
        return True, ""
    info = fastpeft.backend_info()[name]
    return info["available"], info["reason"]


def _run_suites(env: dict, label: str, files: Sequence[str], *args: str) -> None:
    """pytest over ``files`` (in this directory) in a fresh process with ``env``; every test passes."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
         *(os.path.join(HERE, name) for name in files)],
        env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900,
    )
    tail = "\n".join(proc.stdout.splitlines()[-25:])
    assert proc.returncode == 0, f"{', '.join(files)} failed with {label}:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail, tail


def _run_parity(env: dict, label: str) -> None:
    _run_suites(env, label, ["test_peft_parity.py"], "-k", SUBSET)


def _cpu_isas() -> tuple[list[str], str]:
    """(SIMD paths this CPU runs, the one chosen from cpuid); empty when the extension is not built."""
    try:
        from fastpeft import _C
    except ImportError:
        return [], ""
    return list(_C.supported_isas()), _C.isa()


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_peft_parity_suite_through_each_cpu_isa(isa):
    supported, chosen = _cpu_isas()
    if isa not in supported:
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {supported or 'no extension'})")
    if isa == chosen and os.environ.get("FASTPEFT_CPU_ISA", "auto") == "auto":
        pytest.skip(f"{isa} is the path cpuid chose: the default run and the cpu backend run cover it")
    _run_parity(dict(os.environ, FASTPEFT_BACKEND="cpu", FASTPEFT_CPU_ISA=isa), f"FASTPEFT_CPU_ISA={isa}")


@pytest.mark.parametrize("request_value", ["generic", "avx512", "sse9"])
def test_cpu_isa_request_is_honoured_or_reported(request_value):
    """FASTPEFT_CPU_ISA forces the path when the CPU runs it; otherwise the cpu backend is unavailable and says why."""
    supported, _ = _cpu_isas()
    if not supported:
        pytest.skip("the C++ extension is not built")
    probe = ("import fastpeft; from fastpeft.backends.cpu import BACKEND; i = fastpeft.backend_info()['cpu']; "
             "print(i['available'], BACKEND.isa(), '|', i['reason'])")
    out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, FASTPEFT_CPU_ISA=request_value),
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    available, isa, reason = out.split(" ", 2)
    if request_value in supported:
        assert available == "True" and isa == request_value, out
    else:
        assert available == "False" and "FASTPEFT_CPU_ISA" in reason and request_value in reason, out


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_peft_parity_suite_through_backend(backend):
    ok, reason = _available(backend)
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    env = dict(os.environ, FASTPEFT_BACKEND=backend)
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    _run_parity(env, f"FASTPEFT_BACKEND={backend}")


# The suites that choose among routes built on oneDNN's bf16 block kernel (fastpeft._C.widened_mm) and assert which
# routes are offered.
_BLOCK_KERNEL_SUITES = ("test_cpu_backend.py", "test_dora.py", "test_routes.py", "test_settled_training.py")


def test_cpu_suites_as_on_a_cpu_without_the_bf16_block_kernel():
    """A CPU below AVX-512 (the AVX2 kind) has no oneDNN bf16 block kernel: ``_C.widened_mm`` is unavailable there,
    the routes built on it (``split``, ``split_pairs``, ``pairs``, bf16 ``stacked``) are not offered, and fastpeft's
    kernels run their AVX2 path. On a CPU that has the kernel, the cpu backend's and DoRA's suites and the PEFT parity
    subset run once more as such a CPU would run them: oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA``) and fastpeft's
    kernels to theirs (``FASTPEFT_CPU_ISA``), in a fresh process (oneDNN reads the variable once)."""
    supported, _ = _cpu_isas()
    if "avx2" not in supported:
        pytest.skip(f"this CPU cannot run the avx2 path (it runs {supported or 'no extension'})")
    from fastpeft import _C

    if not _C.widened_mm_available():
        pytest.skip("oneDNN has no bf16 block kernel on this CPU: the default run is that run")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", FASTPEFT_CPU_ISA="avx2")
    probe = "from fastpeft import _C; print(_C.widened_mm_available(), _C.isa())"
    held = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert held.stdout.split()[-2:] == ["False", "avx2"], f"the variables did not take effect: {held.stdout}"
    label = "ONEDNN_MAX_CPU_ISA=AVX2 FASTPEFT_CPU_ISA=avx2"
    _run_suites(env, label, _BLOCK_KERNEL_SUITES, "-W", "ignore")
    _run_parity(env, label)
