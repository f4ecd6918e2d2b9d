"""Every recorded Triton launch compiled ahead of time for sm_80 and sm_90, within the GPU's real limits.

No GPU needed (``triton.compile`` with a ``GPUTarget``). The specs come from recorded launches
(``fastpeft.kernels.compile_check.record``: the launchers driven in Triton's interpreter over ranks, dtype pairs,
dropout, both directions, the quantized and mixed-adapter kernels), one per distinct specialization and autotune
config. Checks per spec: tensor-core instructions in the PTX wherever a ``tl.dot`` takes 16-bit operands (``mma.sync``
on sm_80; ``wgmma`` or ``mma.sync`` on sm_90) and none where every dot is exact fp32; no local memory (spills) and no
stack by Triton's bundled ``cuobjdump --dump-resource-usage``; shared memory within 163 KB (sm_80) / 227 KB (sm_90).
KERNELS.md must hold the table of these results. Compiles run two processes at a time and are cached by Triton on
disk, so reruns take seconds.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

from fastpeft.kernels import compile_check as cc  # noqa: E402

SPECS = cc.record()
_RESULTS: dict = {}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ids(specs) -> list[str]:
    """Readable, unique ids: specs that differ only in what the label leaves out (pointer alignment, the output's
    dtype) get a counter."""
    seen: dict = {}
    ids = []
    for s in specs:
        seen[s.label] = seen.get(s.label, 0) + 1
        ids.append(s.label if seen[s.label] == 1 else f"{s.label}#{seen[s.label]}")
    return ids


def _compiled():
    """All specs are compiled on first use, two processes at a time (each compile is single-threaded)."""
    if not _RESULTS:
        try:
            _RESULTS["all"] = cc.measure_all(SPECS, workers=2)
            _RESULTS.update(zip(SPECS, _RESULTS["all"]))
        except Exception as exc:  # fail every case at once instead of recompiling the whole list per case
            _RESULTS["error"] = exc
    if "error" in _RESULTS:
        raise RuntimeError(f"compiling the recorded kernel specs failed: {_RESULTS['error']!r}")
    return _RESULTS


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_recorded_launch_compiles_within_limits(spec):
    r = _compiled()[spec]
    if spec.tensor_cores:
        assert r.tensor_cores, f"a 16-bit tl.dot without tensor-core instructions in the PTX ({r.ptx_mma})"
    else:
        assert not r.tensor_cores, f"exact fp32 dots compiled to tensor-core instructions ({r.ptx_mma})"
    assert r.local == 0, f"{r.local} bytes of local memory (spills); {r.registers} registers"
    assert r.stack == 0, f"{r.stack} bytes of stack; {r.registers} registers"
    assert r.shared <= cc.SMEM_LIMIT[spec.arch], f"{r.shared} B shared > {cc.SMEM_LIMIT[spec.arch]}"


def test_kernels_md_holds_the_table_of_the_recorded_launches():
    from fastpeft.kernels import report

    text = open(os.path.join(REPO, "KERNELS.md")).read()
    section = text[text.index(report.BEGIN):text.index(report.END)]
    expected = report.table(_compiled()["all"])
    got = section.splitlines()[1:1 + len(expected)]
    assert got == expected, "KERNELS.md is stale: run `TRITON_DEFAULT_FP_FUSION=1 python -m fastpeft.kernels.report`"


def test_recording_covers_the_launch_axes():
    """The recorded list spans what the brief of the compile checks names: every kernel, ranks 8 (strides not
    multiples of 16), 16, 64 and two adapters (32), fp32 adapters over bf16 and fp16 and same-dtype pairs, rows not a
    multiple of 16 and a single row, dropout on and off in both directions, int8 and 4-bit (nested or not, row-aligned
    or not) weights, both targets; and no interpreter stand-in tile (its single stage) is left."""
    kernels = {s.short for s in SPECS}
    assert kernels == {"fused_gemm", "quant_gemm", "dequant", "down_proj", "lowrank_update", "grad_a",
                       "mixed_shrink", "mixed_expand"}, kernels
    assert {s.arch for s in SPECS} == {80, 90}
    fused = [s for s in SPECS if s.short == "fused_gemm" and s.const("FUSE_DOWN")]
    assert {s.const("BLOCK_R") for s in fused} == {16, 32, 64}
    assert any("R" not in s.divisible for s in fused), "rank 8: a rank that is not a multiple of 16"
    assert {("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32")} <= {s.dtype_pair for s in fused}
    assert any(s.const("DROP_IN") for s in fused) and any(s.const("DROP_OUT") for s in fused)
    assert any(s.const("DROP") for s in SPECS if s.short == "grad_a")
    assert any("M" not in s.divisible and "M" not in s.ones for s in fused)
    assert any("M" in s.ones for s in SPECS), "decoding: M == 1 compiles as a constant"
    quant = [s for s in SPECS if s.short == "quant_gemm"]
    for flag in ("IS_INT8", "NESTED", "ROW_ALIGNED", "TRANS_W", "HAS_PRE", "IN_SCALE", "OUT_SCALE"):
        assert any(s.const(flag) for s in quant) and not all(s.const(flag) for s in quant), flag
    assert all(s.num_stages > 1 for s in SPECS), "an interpreter stand-in tile was recorded as a GPU launch"


def test_recorder_is_off_by_default_and_records_autotuned_launches_per_config():
    """``_common.RECORDER`` is None unless a recording run sets it; a stand-in launch of the fused GEMM is recorded
    once per config its autotuner keeps for the flags on each target (the dropout variants run one tile)."""
    from fastpeft.kernels import _common

    assert _common.RECORDER is None
    gemm = [s for s in SPECS if s.short == "fused_gemm"]
    for arch in (80, 90):
        nodrop = {s.tile for s in gemm if s.arch == arch and s.dtype_pair == ("bf16", "bf16")
                  and s.const("FUSE_DOWN") and not s.const("DROP_IN") and not s.const("DROP_OUT")}
        tuned = {c for c in _common.GEMM_CONFIGS[arch] if _common.config_allowed(arch, c, {"FUSE_DOWN": True})}
        assert len(nodrop) == len(tuned), (arch, nodrop, tuned)
        drop = {s.tile for s in gemm if s.arch == arch and s.dtype_pair == ("bf16", "bf16") and s.const("DROP_IN")}
        assert len(drop) == 1, drop


def test_recorder_binds_a_launch_as_the_jit_does():
    """A launch of one row, K = 40 and rank 8 records ``M`` and the unit strides as the constant 1, ``K`` and the
    row strides without 16-divisibility, the seed unspecialized (``do_not_specialize``, even at 16), pointer dtypes,
    and the launcher's warps and stages; with ``run=False`` the kernel itself is skipped."""
    import torch

    from fastpeft.kernels import _common, lora

    recorder = cc.LaunchRecorder(archs=(90,), run=False)
    _common.RECORDER = recorder
    try:
        out = lora.down_proj(torch.randn(1, 40), torch.randn(8, 40).t(), seed=16, p=0.1)
    finally:
        _common.RECORDER = None
    assert out.shape == (1, 8)
    (spec,) = recorder.specs
    signature = dict(spec.signature)
    assert spec.kernel == "fastpeft.kernels.lora:_down_proj_kernel" and spec.arch == 90
    assert set(spec.ones) == {"M", "stride_ak", "stride_dk", "stride_or"}, spec.ones
    assert signature["M"] == "constexpr" and signature["seed"] == "i32" and signature["a_ptr"] == "*fp32"
    assert {"K", "stride_am", "seed"}.isdisjoint(spec.divisible) and "a_ptr" in spec.divisible
    assert (spec.const("DROP"), spec.const("BLOCK_R")) == (True, 16)
    assert (spec.num_warps, spec.num_stages) == lora.EXACT_FP32_SMALL_TILE[2:]


def test_fp32_dots_are_exact_unless_torch_allows_tf32(monkeypatch):
    """Every ``tl.dot`` in the kernels takes the launch's ``INPUT_PRECISION``; it is exact fp32 (``"ieee"``, FMA
    code on the small exact-fp32 tiles) unless torch's own matmul is allowed TF32, so an fp32 LoRA on a GPU means
    what PEFT's fp32 layers mean there. The recorded launches are the exact ones."""
    import pathlib
    import re

    import torch

    from fastpeft.kernels import _common, lora

    assert not _common.torch_allows_tf32(), "torch's default is exact fp32 matmul"
    assert _common.dot_precision() == "ieee" and _common.exact_fp32(torch.bfloat16, torch.float32)
    assert not _common.exact_fp32(torch.bfloat16, torch.float16)
    assert _common.gemm_configs(90, True) == _common.EXACT_FP32_CONFIGS[90]
    assert lora.small_tile("grad_a", torch.float32) == lora.EXACT_FP32_SMALL_TILE
    assert all(s.const("INPUT_PRECISION") == "ieee" for s in SPECS if s.short != "dequant"), "dequant has no dot"
    exact = [s for s in SPECS if not s.tensor_cores]
    assert {s.short for s in exact} >= {"fused_gemm", "mixed_shrink", "down_proj", "grad_a"}, "fp32-only dots"
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


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "capturing"])
def test_autotuning_under_cuda_graph_capture_times_nothing(monkeypatch, capturing):
    """Timing the configs of a key first met during a CUDA graph capture would record the timing launches into the
    graph: there the autotuners' pruning keeps one config (the first allowed for the launch's flags), so Triton
    takes it without benchmarking; outside a capture every allowed config stays a candidate."""
    from fastpeft.kernels import _common

    monkeypatch.setattr(_common, "capturing_cuda_graph", lambda: capturing)
    tuner = _common.autotuned(_common._fused_gemm_kernel, _common.GEMM_CONFIGS, 80, False, _common._AUTOTUNE_KEY,
                              allowed=_common.config_allowed)
    flags = dict(FUSE_DOWN=False, DROP_IN=False, DROP_OUT=False)
    allowed = [c for c in tuner.configs if _common.config_allowed(80, _config_tuple(c), flags)]
    kept = tuner.early_config_prune(tuner.configs, {}, **flags)
    assert len(allowed) > 1
    assert kept == (allowed[:1] if capturing else allowed)


def _config_tuple(config):
    """A ``triton.Config`` of the fused GEMM back as its ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)`` entry."""
    import torch

    from fastpeft.kernels import _common

    for entry in _common.GEMM_CONFIGS[80]:
        kw = _common.config_kwargs(entry, torch.float16)
        if all(config.kwargs.get(k) == v for k, v in kw.items() if k not in ("num_warps", "num_stages")) and (
                config.num_warps == kw["num_warps"] and config.num_stages == kw["num_stages"]):
            return entry
    raise AssertionError(f"no GEMM_CONFIGS entry for {config}")
