"""Every fastpeft Triton kernel, in every autotune config and dtype, compiled ahead of time for sm_80 and sm_90.

No GPU needed (``triton.compile`` with a ``GPUTarget``). Checks per kernel: tensor cores in the PTX (``mma.sync`` on
sm_80, ``wgmma`` on sm_90; fp32 inputs go through tf32), no stack and no local memory (spills) by Triton's bundled
``cuobjdump --dump-resource-usage``, shared memory within 163 KB (sm_80) / 227 KB (sm_90). The list of variants is
``fastpeft.kernels.compile_check.specs``; ``python -m fastpeft.kernels.report`` prints the same measurements into
KERNELS.md. Compiled results are cached by Triton on disk, so reruns take seconds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from fastpeft.kernels import compile_check as cc  # noqa: E402

SPECS = [s for arch in (80, 90) for s in cc.specs(arch)]
_RESULTS: dict = {}


def _id(s):
    return f"sm{s.arch}-{s.name}-{s.dtype}-{s.config.replace(' ', '')}"


def _compiled(spec):
    """All variants are compiled on first use, two processes at a time (each compile is single-threaded)."""
    if not _RESULTS:
        try:
            _RESULTS.update({_id(r.spec): r for r in cc.measure_all((80, 90), workers=2)})
        except Exception as exc:  # fail every case at once instead of recompiling the whole list per case
            _RESULTS["error"] = exc
    if "error" in _RESULTS:
        raise RuntimeError(f"compiling the kernel variants failed: {_RESULTS['error']!r}")
    return _RESULTS[_id(spec)]


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_kernel_compiles_for_target(spec):
    r = _compiled(spec)
    name = _id(spec)
    if spec.gemm:
        assert r.tensor_cores, f"{name}: no tensor-core instruction in PTX ({r.ptx_mma})"
    assert r.local == 0, f"{name}: {r.local} bytes of local memory (spills)"
    assert r.stack == 0, f"{name}: {r.stack} bytes of stack"
    assert r.shared <= cc.SMEM_LIMIT[spec.arch], f"{name}: {r.shared} B shared > {cc.SMEM_LIMIT[spec.arch]}"
    assert r.registers <= 255, f"{name}: {r.registers} registers"
