"""Every fastpeft Triton kernel, in every autotune config and dtype, compiled ahead of time for sm_80 and sm_90.

No GPU needed (``triton.compile`` with a ``GPUTarget``). Checks per kernel: tensor cores in the PTX (``mma.sync`` on
sm_80, ``wgmma`` on sm_90) for 16-bit inputs (fp32 dots are exact fp32 by default, see ``_common.dot_precision``),
no stack and no local memory (spills) by Triton's bundled ``cuobjdump --dump-resource-usage``, shared memory within
163 KB (sm_80) / 227 KB (sm_90). The list of variants is ``fastpeft.kernels.compile_check.specs``;
``python -m fastpeft.kernels.report`` prints the same measurements into KERNELS.md. Compiled results are cached by
Triton on disk, so reruns take seconds.
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


def test_fp32_dots_are_exact_unless_torch_allows_tf32(monkeypatch):
    """Every ``tl.dot`` in the kernels takes the launch's ``INPUT_PRECISION``; it is exact fp32 (``"ieee"``, FMA
    code on the small exact-fp32 tiles) unless torch's own matmul is allowed TF32, so an fp32 LoRA on a GPU means
    what PEFT's fp32 layers mean there. The compiled fp32 variants are the exact ones."""
    import pathlib
    import re

    import torch

    from fastpeft.kernels import _common, lora

    assert not _common.torch_allows_tf32(), "torch's default is exact fp32 matmul"
    assert _common.dot_precision() == "ieee" and _common.exact_fp32(torch.bfloat16, torch.float32)
    assert not _common.exact_fp32(torch.bfloat16, torch.float16)
    assert _common.gemm_configs(90, True) == _common.EXACT_FP32_CONFIGS[90]
    assert lora.small_tile("grad_a", torch.float32) == lora.EXACT_FP32_SMALL_TILE
    fp32_specs = [s for s in SPECS if s.dtype == "fp32" or s.name.startswith("mixed_")]  # mixed: fp32 adapters
    assert fp32_specs and all(s.constexprs["INPUT_PRECISION"] == "ieee" for s in fp32_specs)
    assert all(not s.gemm for s in fp32_specs), "exact fp32 dots are FMA code: no tensor cores to require"
    kernels_dir = pathlib.Path(_common.__file__).parent
    found = 0
    for path in kernels_dir.glob("*.py"):
        text = path.read_text()
        calls = re.findall(r"tl\.dot\((?:[^()]|\([^()]*(?:\([^()]*\))*[^()]*\))*\)", text)
        assert len(calls) == text.count("tl.dot("), f"{path.name}: a tl.dot call the check could not parse"
        for call in calls:
            assert "input_precision=" in call, f"{path.name}: {call[:80]} leaves fp32 precision to Triton (TF32)"
        found += len(calls)
    assert found >= 9, found
    monkeypatch.setattr(_common, "torch_allows_tf32", lambda: True)
    assert _common.dot_precision() == "tf32" and not _common.exact_fp32(torch.float32)
    assert _common.gemm_configs(80, _common.exact_fp32(torch.float32)) == _common.GEMM_CONFIGS[80]


def test_autotuning_is_keyed_on_the_m_bucket_not_the_exact_m():
    """A new token count must not re-benchmark every config (every step under dynamic padding): the autotuners of the
    fused and the dequantizing GEMM key on ``M_BUCKET`` (M rounded up to a power of two, passed by the launchers)."""
    from fastpeft.kernels import _common, quant_matmul

    for key, kernel in ((_common._AUTOTUNE_KEY, _common._fused_gemm_kernel),
                        (quant_matmul._AUTOTUNE_KEY, quant_matmul._quant_gemm_kernel)):
        assert "M_BUCKET" in key and "M" not in key, key
        assert "M_BUCKET" in kernel.arg_names
    assert [_common.next_pow2(m) for m in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
