"""The PEFT parity suite again, with each backend forced through FASTPEFT_BACKEND, in a fresh process.

A fresh process is needed because ``TRITON_INTERPRET`` must be set before Triton is imported. The transformer
families are left to the default run (they exercise the module layer, not the backend); the MLP, Conv1D,
multi-adapter, IA3, low-precision and dropout cases run here through every backend that is available.
"""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_peft_parity_suite_through_backend(backend):
    ok, reason = _available(backend)
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    env = dict(os.environ, FASTPEFT_BACKEND=backend)
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SUBSET,
         os.path.join(HERE, "test_peft_parity.py")],
        env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900,
    )
    tail = "\n".join(proc.stdout.splitlines()[-25:])
    assert proc.returncode == 0, f"parity suite failed with FASTPEFT_BACKEND={backend}:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail, tail
