"""The CUDA backend's kernels (``csrc/cuda``), checked without a GPU, plus GPU tests that run where one exists.

- Compile for the real chips: every ``csrc/cuda/*.cu`` is compiled once per target (sm_80, sm_90a) with
  ``nvcc -cubin -Xptxas -v``; the report must show no spills, no stack, registers under a stated cap and shared
  memory that fits, and the SASS (triton's bundled ``cuobjdump``) must show HMMA in the tensor-core kernels.
- Philox on the host: ``csrc/cuda/host_reference.cpp`` includes the same ``__host__ __device__`` headers as the
  kernels (``philox.cuh``, ``lora_math.cuh``); built with g++, it must reproduce ``fastpeft._philox`` bit for bit and,
  through plain loops over the kernels' per-element formulas, ``fastpeft.reference``'s LoRA forward and gradients.
  (The tile loops and WMMA fragments themselves only run on a GPU: see the ``gpu`` tests.)
- ``gpu``: the ``cuda`` backend against the reference backend on a CUDA device; collected everywhere.

``python tests/test_cuda_compile.py`` prints the resource table kept in KERNELS.md.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
NVCC = (os.environ.get("NVCC") or shutil.which("nvcc")
        or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None))

# target name -> (nvcc -gencode, shared memory per block the chip allows: 163 KB on A100, 227 KB on H100)
TARGETS = {
    "sm_80": ("arch=compute_80,code=sm_80", 163 * 1024),
    "sm_90a": ("arch=compute_90a,code=sm_90a", 227 * 1024),
}
# 4 warps per block and a 64x64 fp32 accumulator tile need ~70-100 registers; 128 keeps 4 blocks per SM possible.
TENSOR_CORE_REG_CAP = 128
OTHER_REG_CAP = 64
TENSOR_CORE_KERNELS = ("lora_down_dropout_kernel", "lora_up_epilogue_kernel", "lora_backward_dx_mask_kernel",
                       "lora_grad_A_kernel")


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _demangle(names):
    """Readable kernel names: ``lora_down_dropout_kernel<__half>``; mangled names where c++filt is missing."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout.split("\n")
    result = {}
    for mangled, pretty in zip(names, out):
        pretty = pretty.replace("(anonymous namespace)::", "").replace("fastpeft::cuda::", "")
        pretty = pretty.split("(", 1)[0]
        result[mangled] = pretty[5:] if pretty.startswith("void ") else pretty
    return result


def parse_ptxas(report: str) -> dict[str, dict]:
    """``{mangled: {regs, smem, stack, spill_stores, spill_loads}}`` from ``-Xptxas -v`` output."""
    kernels: dict[str, dict] = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {"regs": 0, "smem": 0, "stack": 0, "spill_stores": 0,
                                                      "spill_loads": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return kernels


def hmma_counts(sass: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            counts[current] = 0
        elif current is not None and re.search(r"\bHMMA\.", line):
            counts[current] += 1
    return counts


def compile_all(workdir: str) -> dict[str, dict[str, dict]]:
    """``{target: {kernel name: resources + hmma}}`` for every .cu, each compiled once per target (in parallel)."""
    sources = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
    jobs = []
    for target, (gencode, _) in TARGETS.items():
        for src in sources:
            cubin = os.path.join(workdir, f"{os.path.basename(src)}.{target}.cubin")
            cmd = [NVCC, "-std=c++17", "-O3", "-cubin", f"-gencode={gencode}", "-Xptxas", "-v", "-I", CUDA_DIR,
                   "-o", cubin, src]
            jobs.append((target, cubin, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                         text=True)))
    cuobjdump = _cuobjdump()
    results: dict[str, dict[str, dict]] = {t: {} for t in TARGETS}
    for target, cubin, proc in jobs:
        report, _ = proc.communicate()
        assert proc.returncode == 0, f"nvcc failed for {cubin}:\n{report}"
        kernels = parse_ptxas(report)
        hmma = hmma_counts(subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True,
                                          check=True).stdout) if cuobjdump else {}
        names = _demangle(list(kernels))
        for mangled, res in kernels.items():
            res["hmma"] = hmma.get(mangled, -1 if not cuobjdump else 0)
            results[target][names[mangled]] = res
    return results


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set NVCC or put it on PATH)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    return compile_all(str(tmp_path_factory.mktemp("cuda_cubins")))


def _tensor_core(name: str) -> bool:
    return name.startswith(TENSOR_CORE_KERNELS)


@needs_nvcc
@pytest.mark.parametrize("target", list(TARGETS))
def test_cuda_kernels_compile_every_instantiation(compiled, target):
    names = list(compiled[target])
    # 2 operand dtypes x (down, grad_A) + 2 x 2 output dtypes x (up, dx) tensor-core instantiations.
    assert sum(_tensor_core(n) for n in names) == 12, names
    assert any(n.startswith("ia3_scale_cols_kernel") for n in names)
    assert any(n.startswith("ia3_col_dot_kernel") for n in names)


@needs_nvcc
@pytest.mark.parametrize("target", list(TARGETS))
def test_cuda_kernels_no_spills_no_stack(compiled, target):
    bad = {n: r for n, r in compiled[target].items() if r["stack"] or r["spill_stores"] or r["spill_loads"]}
    assert not bad, f"{target}: local memory used: {bad}"


@needs_nvcc
@pytest.mark.parametrize("target", list(TARGETS))
def test_cuda_kernels_registers_under_cap(compiled, target):
    over = {n: r["regs"] for n, r in compiled[target].items()
            if r["regs"] > (TENSOR_CORE_REG_CAP if _tensor_core(n) else OTHER_REG_CAP)}
    assert not over, f"{target}: registers over cap ({TENSOR_CORE_REG_CAP} tensor-core, {OTHER_REG_CAP} other): {over}"


@needs_nvcc
@pytest.mark.parametrize("target", list(TARGETS))
def test_cuda_kernels_shared_memory_fits(compiled, target):
    limit = TARGETS[target][1]
    over = {n: r["smem"] for n, r in compiled[target].items() if r["smem"] > limit}
    assert not over, f"{target}: shared memory over {limit} bytes: {over}"


@needs_nvcc
@pytest.mark.parametrize("target", list(TARGETS))
def test_cuda_tensor_core_kernels_use_hmma(compiled, target):
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (triton's bundled one or on PATH)")
    missing = [n for n, r in compiled[target].items() if _tensor_core(n) and r["hmma"] <= 0]
    assert not missing, f"{target}: no HMMA in {missing}"


# --------------------------------------------------------------------------------- host build of the kernel math
@pytest.fixture(scope="module")
def host_reference(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = str(tmp_path_factory.mktemp("cuda_host") / "host_reference")
    subprocess.run([cxx, "-O2", "-std=c++17", "-Wall", "-Werror", "-o", exe,
                    os.path.join(CUDA_DIR, "host_reference.cpp")], check=True)
    return exe


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**33 + 5])
def test_cuda_philox_header_matches_python_bit_for_bit(host_reference, seed):
    from fastpeft._philox import dropout_keep_mask, philox_half, philox_uniform

    rows, cols, p = 7, 131, 0.37
    offsets = list(range(rows * cols)) + [2**32 - 1, 2**32, 2**32 + 12345, 2**35 - 1, 2**35, 2**35 + 6,
                                          3 * 2**40 + 7]
    out = subprocess.run([host_reference, "philox", str(seed), repr(p)], input="\n".join(map(str, offsets)),
                         capture_output=True, text=True, check=True).stdout.split()
    draws, bits, keep = (torch.tensor([int(v) for v in out[i::3]], dtype=torch.int64) for i in range(3))
    offs = torch.tensor(offsets, dtype=torch.int64)
    assert torch.equal(draws, philox_half(seed, offs)), "16-bit Philox draws differ"
    assert torch.equal(bits, philox_uniform(seed, offs).view(torch.int32).to(torch.int64)), "uniforms differ"
    expected_keep = dropout_keep_mask(seed, rows, cols, p).flatten().to(torch.int64)
    assert torch.equal(keep[: rows * cols], expected_keep), "keep masks differ"


@pytest.mark.parametrize("M,K,N,r,p", [(1, 1, 1, 1, 0.0), (5, 37, 11, 3, 0.3), (13, 123, 97, 16, 0.1),
                                       (4, 70, 9, 1, 0.0)], ids=lambda v: str(v))
def test_cuda_kernel_math_host_build_matches_reference(host_reference, tmp_path, M, K, N, r, p):
    from fastpeft.backends.reference_backend import ReferenceBackend

    gen = torch.Generator().manual_seed(M * 1000 + K)
    seed = 1234 + K
    x, A, B = (torch.randn(*s, generator=gen) for s in ((M, K), (r, K), (N, r)))
    bias, g, dx0 = torch.randn(N, generator=gen), torch.randn(M, r, generator=gen), torch.randn(M, K, generator=gen)
    s = 0.75
    with open(tmp_path / "in.bin", "wb") as f:
        f.write(struct.pack("<5q2f", M, K, N, r, seed, p, s))
        for t in (x, A, B, bias, g, dx0):
            f.write(t.contiguous().numpy().tobytes())
    subprocess.run([host_reference, "lora", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    flat = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32)
    xa, update, dx, dA = torch.split(flat, [M * r, M * N, M * K, r * K])

    ref = ReferenceBackend()
    W = torch.zeros(N, K)
    y_ref, (xa_ref,) = ref.lora_forward(x, W, None, [A], [B], [bias], [s], [p], [seed])
    # g enters the reference as s * dY B: pick dY with dY B = g / s (B is (N, r), least-squares exact for r <= N).
    dy = torch.linalg.lstsq(B.t().double(), (g / s).t().double()).solution.t().float()
    g_ref = (dy.double() @ B.double()) * s
    torch.testing.assert_close(g_ref.float(), g, rtol=1e-4, atol=1e-4)  # every case here has r <= N
    dx_ref, (dA_ref,), _, _ = ref.lora_backward(dy, x, torch.zeros(N, K), [A], [B], [xa_ref], [s], [p], [seed],
                                                True, True)
    tol = dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(xa.view(M, r), xa_ref, **tol, msg="xa")
    torch.testing.assert_close(update.view(M, N), y_ref, **tol, msg="y update")
    torch.testing.assert_close(dx.view(M, K) - dx0, dx_ref, **tol, msg="dx")
    torch.testing.assert_close(dA.view(r, K), dA_ref, **tol, msg="dA")


# ------------------------------------------------------------------------------------------------- on a GPU
def _rel(a, e):
    a, e = a.detach().double(), e.detach().double()
    d = e.norm().item()
    return (a - e).norm().item() / d if d else (a - e).norm().item()


def _cuda_backend_or_skip():
    from fastpeft.backends import availability

    ok, reason = availability("cuda")
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    from fastpeft.backends.cuda import BACKEND

    return BACKEND


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,N,r,p", [(1, 123, 97, 1, 0.0), (37, 256, 130, 16, 0.1), (200, 1025, 64, 256, 0.2)],
                         ids=lambda v: str(v))
def test_cuda_backend_lora_matches_reference(dtype, M, K, N, r, p):
    """Forward and every gradient against the reference: at most 2x the error of the reference run in ``dtype``."""
    from fastpeft.backends.reference_backend import ReferenceBackend

    cuda = _cuda_backend_or_skip()
    ref = ReferenceBackend()
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    x32, W32, A32, B32, b32, dy32 = mk(M, K), mk(N, K) / K**0.5, mk(r, K) / K**0.5, mk(N, r), mk(N), mk(M, N)
    args = lambda t: ([A32.to(t)], [B32.to(t)], [b32.to(t)], [0.5], [p], [77])  # noqa: E731
    low = [x32.to(dtype), W32.to(dtype), None]
    y, xa = cuda.lora_forward(*low, *args(dtype))
    y_lo, xa_lo = ref.lora_forward(*low, *args(dtype))
    y_32, xa_32 = ref.lora_forward(x32, W32, None, *args(torch.float32))
    for name, a, lo, hi in (("y", y, y_lo, y_32), ("xa", xa[0], xa_lo[0], xa_32[0])):
        assert _rel(a, hi) <= 2 * _rel(lo, hi) + 1e-6, f"{name}: {_rel(a, hi):.3e} vs ref {_rel(lo, hi):.3e}"
    A_, B_, _, s_, p_, seeds = args(dtype)
    got = cuda.lora_backward(dy32.to(dtype), low[0], low[1], A_, B_, xa, s_, p_, seeds, True, True)
    lo = ref.lora_backward(dy32.to(dtype), low[0], low[1], A_, B_, xa_lo, s_, p_, seeds, True, True)
    A3, B3, _, _, _, _ = args(torch.float32)
    hi = ref.lora_backward(dy32, x32, W32, A3, B3, xa_32, s_, p_, seeds, True, True)
    for name, a, l_, h in (("dx", got[0], lo[0], hi[0]), ("dA", got[1][0], lo[1][0], hi[1][0]),
                           ("dB", got[2][0], lo[2][0], hi[2][0])):
        assert _rel(a, h) <= 2 * _rel(l_, h) + 1e-6, f"{name}: {_rel(a, h):.3e} vs ref {_rel(l_, h):.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("ff", [True, False], ids=["ff", "out"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_backend_ia3_matches_reference(dtype, ff):
    from fastpeft.backends.reference_backend import ReferenceBackend

    cuda = _cuda_backend_or_skip()
    ref = ReferenceBackend()
    M, K, N = 33, 123, 97
    x, W, b = torch.randn(M, K, device="cuda", dtype=dtype), torch.randn(N, K, device="cuda", dtype=dtype), None
    scale = torch.rand(K if ff else N, device="cuda") + 0.5
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(cuda.ia3_forward(x, W, b, scale, ff), ref.ia3_forward(x, W, b, scale, ff)) <= tol
    got, exp = cuda.ia3_backward(dy, x, W, b, scale, ff, True), ref.ia3_backward(dy, x, W, b, scale, ff, True)
    assert _rel(got[0], exp[0]) <= tol, "dx"
    assert _rel(got[1], exp[1]) <= tol, "dscale"


# ------------------------------------------------------------------------------------------- KERNELS.md table
def markdown_table(results) -> str:
    lines = ["| kernel | target | registers | shared memory (B) | spill st/ld (B) | stack (B) | HMMA |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for target, kernels in results.items():
        for name in sorted(kernels):
            r = kernels[name]
            lines.append(f"| `{name}` | {target} | {r['regs']} | {r['smem']} | {r['spill_stores']}/{r['spill_loads']} "
                         f"| {r['stack']} | {r['hmma']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if NVCC is None:
        sys.exit("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        print(markdown_table(compile_all(tmp)))
