"""The Triton kernels' launches compiled ahead of time for sm_80 and sm_90, and measured (no GPU needed).

What is compiled is recorded, not listed by hand. ``record()`` runs ``fastpeft.kernels.record_launches`` (every
launcher over ranks, dtype pairs, dropout, both directions, the quantized and mixed-adapter kernels) in Triton's
interpreter with a ``LaunchRecorder`` as ``_common.RECORDER``. The recorder binds each launch's arguments the way
Triton's JIT does for the target (``create_function_from_signature`` with the CUDA backend), so a ``Spec`` holds
what the GPU would compile: pointer dtypes, integer arguments equal to 1 (compiled as constants, e.g. unit strides),
16-divisibility of integers and pointer addresses, the constexprs, ``num_warps`` and ``num_stages``. Where the
interpreter ran a stand-in tile for a launch a GPU autotunes, one spec per config the autotuner may run for that
key on the target is recorded instead (``_common.launch``'s ``gpu_tiles``). Equal specs are one compile.

``compile_spec`` measures a spec: registers, stack and local (spill) bytes from Triton's bundled ``cuobjdump
--dump-resource-usage``, shared memory from the kernel metadata, and the tensor-core instructions in the PTX
(``mma.sync``; ``wgmma.mma_async`` on sm_90). Used by ``tests/test_triton_compile.py`` and by
``python -m fastpeft.kernels.report`` (which writes KERNELS.md).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


# --------------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Spec:
    """One kernel specialization for one target, as Triton's JIT would compile it; plain values only (specs cross
    process boundaries as JSON)."""

    kernel: str          # "module:name" of the @triton.jit function
    arch: int            # 80 or 90
    signature: tuple     # ((argument, type), ...); type "constexpr" for constexprs and integers equal to 1
    constexprs: tuple    # ((argument, value), ...); a tl.dtype value is written "tl.<name>"
    divisible: tuple     # arguments with tt.divisibility 16 (pointer address or integer)
    ones: tuple          # integer arguments equal to 1, compiled as that constant
    num_warps: int
    num_stages: int

    @property
    def short(self) -> str:
        return self.kernel.split(":")[1].strip("_").removesuffix("_kernel")

    def const(self, name: str, default=None):
        return dict(self.constexprs).get(name, default)

    def arg_type(self, name: str) -> str:
        kind = dict(self.signature)[name]
        if kind == "constexpr":
            value = self.const(name)
            return value[3:] if isinstance(value, str) and value.startswith("tl.") else kind
        return kind

    def ptr_dtype(self, name: str) -> str:
        return dict(self.signature)[name].lstrip("*")

    @property
    def variant(self) -> str:
        """The kernel and its feature flags, e.g. ``fused_gemm[FUSE_DOWN,DROP_IN,STORE_DOWN]``."""
        flags = [k for k, v in self.constexprs if v is True and k != "STORE_OUT"]
        if self.const("STORE_OUT") is False:
            flags.append("no STORE_OUT")
        if self.short in ("quant_gemm", "dequant"):
            flags.insert(0, f"W={self.const('W_DTYPE')[3:]}")
        return f"{self.short}[{','.join(flags)}]" if flags else self.short

    @property
    def dtype_pair(self) -> tuple[str, str]:
        """(base/input dtype, adapter dtype or "-"): the activations' pointer and the pointer of the adapter's own
        operand in this launch (``_DTYPE_ARGS``)."""
        inp, adapter = _DTYPE_ARGS[self.short](self)
        return self.ptr_dtype(inp), (self.ptr_dtype(adapter) if adapter else "-")

    @property
    def rank_tile(self) -> str:
        """The padded rank of a fused low-rank product (``BLOCK_R``), or ``/w`` for the slice width of a loop over
        ranks (``BLOCK_RP``, ``lowrank_update``'s ``BLOCK_R``); "-" without a low-rank term."""
        if self.short == "fused_gemm":
            if self.const("FUSE_DOWN"):
                return str(self.const("BLOCK_R"))
            return f"/{self.const('BLOCK_RP')}" if self.const("HAS_PRE") else "-"
        if self.short == "quant_gemm":
            return f"/{self.const('BLOCK_RP')}" if self.const("HAS_PRE") else "-"
        if self.short == "lowrank_update":
            return f"/{self.const('BLOCK_R')}"
        return str(self.const("BLOCK_R", "-"))

    @property
    def tile(self) -> str:
        c = dict(self.constexprs)
        dims = [c.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C") if k in c]
        return "x".join(map(str, dims)) + f" w{self.num_warps} s{self.num_stages}"

    @property
    def specialized(self) -> str:
        """Integer arguments compiled as the constant 1 (``M=1``; strides as ``unit:`` without their ``stride_``
        prefix) and those without 16-divisibility (``not%16:``)."""
        short = [k.removeprefix("stride_") for k in self.ones if k.startswith("stride_")]
        parts = [f"{k}=1" for k in self.ones if not k.startswith("stride_")]
        if short:
            parts.append("unit:" + ",".join(short))
        odd = [k.removeprefix("stride_") for k, t in self.signature
               if t in ("i32", "i64") and k not in self.divisible and k not in _UNSPECIALIZED]
        if odd:
            parts.append("not%16:" + ",".join(odd))
        return " ".join(parts)

    @property
    def tensor_cores(self) -> bool:
        """Whether the kernel must use tensor cores: some ``tl.dot`` takes 16-bit operands (or fp32 ones in TF32).
        When False every dot is exact fp32 (``INPUT_PRECISION="ieee"``), which must be FMA code."""
        types = {self.arg_type(a) if a.isupper() else self.ptr_dtype(a) for a in _DOT_ARGS[self.short](self)}
        return bool(types - {"fp32"}) or self.const("INPUT_PRECISION") == "tf32"

    @property
    def label(self) -> str:
        inp, adapter = self.dtype_pair
        spec = self.specialized.replace(" ", "-")
        return f"sm{self.arch}-{self.variant}-{inp}-{adapter}-r{self.rank_tile}-{self.tile.replace(' ', '')}" + (
            f"-{spec}" if spec else "")


# Arguments a launch passes that are never specialized (a seed) or whose divisibility means nothing for the code.
_UNSPECIALIZED = {"seed", "M_BUCKET"}


def _flag(spec: Spec, name: str) -> bool:
    return bool(spec.const(name))


# Per kernel: (the activations' pointer, the pointer of the adapter operand of this launch or None).
_DTYPE_ARGS = {
    "fused_gemm": lambda s: ("a_ptr", "dn_ptr" if _flag(s, "FUSE_DOWN") else "upre_ptr" if _flag(s, "HAS_PRE")
                             else "vin_ptr" if _flag(s, "IN_SCALE") else "vout_ptr" if _flag(s, "OUT_SCALE")
                             else None),
    "quant_gemm": lambda s: ("a_ptr", "upre_ptr" if _flag(s, "HAS_PRE") else "vin_ptr" if _flag(s, "IN_SCALE")
                             else "vout_ptr" if _flag(s, "OUT_SCALE") else None),
    "down_proj": lambda s: ("a_ptr", "dn_ptr"),
    "lowrank_update": lambda s: ("base_ptr", "rhs_ptr"),
    "grad_a": lambda s: ("x_ptr", "out_ptr"),
    "mixed_shrink": lambda s: ("x_ptr", "a_ptr"),
    "mixed_expand": lambda s: ("y_ptr", "bt_ptr"),
    "dequant": lambda s: ("out_ptr", None),
}
# Per kernel: the pointers (or dtype constexprs, upper case) whose element types its tl.dot operands take, read from
# the kernels' code: the fused GEMM's main dot is on a and b (one dtype), its low-rank dots on the adapters' dtype;
# the small kernels cast both operands to the adapter's; the mixed kernels dot fp32 stacked adapters.
_DOT_ARGS = {
    "fused_gemm": lambda s: ["a_ptr"] + (["dn_ptr", "up_ptr"] if _flag(s, "FUSE_DOWN") else [])
    + (["upre_ptr"] if _flag(s, "HAS_PRE") else []),
    "quant_gemm": lambda s: ["DOT_DTYPE"],
    "down_proj": lambda s: ["dn_ptr"],
    "lowrank_update": lambda s: ["rhs_ptr"],
    "grad_a": lambda s: ["out_ptr"],
    "mixed_shrink": lambda s: ["a_ptr"],
    "mixed_expand": lambda s: ["bt_ptr"],
    "dequant": lambda s: [],
}


def _plain(value):
    """A constexpr value as plain JSON data (tl.dtype as ``"tl.<name>"``)."""
    if isinstance(value, triton.language.dtype):
        return f"tl.{value.name}"
    return value


# -------------------------------------------------------------------------------------------------- recording
def compilable(fn):
    """The ``JITFunction`` of ``fn`` (an ``InterpretedFunction`` under TRITON_INTERPRET=1 is rebuilt from its Python
    function with the same options, e.g. ``do_not_specialize``)."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(fn, InterpretedFunction):
        return triton.JITFunction(fn.fn, **fn.kwargs)
    return fn


class LaunchRecorder:
    """Collects the ``Spec`` of every launch it is shown (as ``_common.RECORDER``), for each target in ``archs``."""

    def __init__(self, archs=ARCHS, run: bool = True):
        self.archs = tuple(archs)
        self.run = run  # whether the launches it is shown still run (False: only their specs are wanted)
        self.specs: dict[Spec, int] = {}  # spec -> number of launches that gave it
        self._binders: dict = {}

    def _binder(self, fn, arch: int):
        key = (fn.fn, arch)
        if key not in self._binders:
            from triton.compiler.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature

            jit = compilable(fn)
            backend = make_backend(GPUTarget("cuda", arch, 32))
            self._binders[key] = (jit, backend, create_function_from_signature(jit.signature, jit.params, backend))
        return self._binders[key]

    def __call__(self, kernel, args, kwargs, gpu_tiles=None) -> bool:
        from triton.runtime.autotuner import Autotuner

        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        for arch in self.archs:
            jit, backend, binder = self._binder(fn, arch)
            named = dict(zip(jit.arg_names, args), **kwargs)
            for tile in gpu_tiles(arch, named) if gpu_tiles is not None else [{}]:
                launch_kwargs = {**kwargs, **tile}
                bound, specialization, options = binder(*args, **launch_kwargs)
                opts, signature, constexprs, attrs = jit._pack_args(backend, launch_kwargs, bound, specialization,
                                                                    options)
                names = jit.arg_names
                spec = Spec(
                    kernel=f"{jit.fn.__module__}:{jit.fn.__name__}", arch=arch,
                    signature=tuple(signature.items()),
                    constexprs=tuple((names[path[0]], _plain(v)) for path, v in sorted(constexprs.items())),
                    divisible=tuple(names[path[0]] for path, a in sorted(attrs.items())
                                    if ["tt.divisibility", 16] in a),
                    ones=tuple(names[path[0]] for path in sorted(constexprs) if not jit.params[path[0]].is_constexpr),
                    num_warps=opts.num_warps, num_stages=opts.num_stages)
                self.specs[spec] = self.specs.get(spec, 0) + 1
        return self.run

    def to_json(self) -> list:
        return [dict(spec.__dict__, launches=count) for spec, count in self.specs.items()]


def _spec_of(row: dict) -> Spec:
    row = {k: v for k, v in row.items() if k != "launches"}
    row["signature"] = tuple(tuple(x) for x in row["signature"])
    row["constexprs"] = tuple(tuple(x) for x in row["constexprs"])
    row["divisible"] = tuple(row["divisible"])
    row["ones"] = tuple(row["ones"])
    return Spec(**row)


def record(timeout: float = 900) -> list[Spec]:
    """Every spec the launchers give, by ``record_launches`` in a child process under the interpreter, sorted by
    target and kernel."""
    # PYTHONSAFEPATH: the repo's kernels/ folder must not shadow Hugging Face's `kernels`, which bitsandbytes imports
    env = dict(os.environ, TRITON_INTERPRET="1", FASTPEFT_ROUTE_CACHE="off", PYTHONSAFEPATH="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "specs.json")
        proc = subprocess.run([sys.executable, "-m", "fastpeft.kernels.record_launches", out], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"recording the launches failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            rows = json.load(f)
    specs = [_spec_of(row) for row in rows]
    return sorted(specs, key=lambda s: (s.arch, s.short, s.variant, s.dtype_pair, s.rank_tile, s.tile, s.label))


# ------------------------------------------------------------------------------------------------- compiling
@dataclass
class Result:
    spec: Spec
    registers: int
    stack: int
    local: int
    shared: int
    ptx_mma: dict = field(default_factory=dict)

    @property
    def tensor_cores(self) -> bool:
        """``mma.sync`` in the PTX (Ampere's tensor cores; sm_90 runs it too), or ``wgmma`` on sm_90."""
        return self.ptx_mma.get("mma.sync", 0) > 0 or self.ptx_mma.get("wgmma", 0) > 0


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """``{"REG", "STACK", "SHARED", "LOCAL"}`` of the (single) kernel in ``cubin``, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{text}")
    return found


def _value(value):
    if isinstance(value, str) and value.startswith("tl."):
        return triton.language.dtype(value[3:])
    return value


def compile_spec(spec: Spec) -> Result:
    """Compile ``spec`` for its target (Triton must be in compile mode: TRITON_INTERPRET unset or 0)."""
    from triton.compiler import ASTSource

    module, name = spec.kernel.split(":")
    fn = compilable(getattr(importlib.import_module(module), name))
    index = {arg: i for i, arg in enumerate(fn.arg_names)}
    attrs = {(index[arg],): [["tt.divisibility", 16]] for arg in spec.divisible}
    src = ASTSource(fn=fn, signature=dict(spec.signature),
                    constexprs={arg: _value(v) for arg, v in spec.constexprs}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = k.asm["ptx"]
    usage = resource_usage(k.asm["cubin"])
    mma = {"mma.sync": ptx.count("mma.sync"), "wgmma": ptx.count("wgmma.mma_async")}
    return Result(spec, usage["REG"], usage.get("STACK", 0), usage.get("LOCAL", 0),
                  int(k.metadata.shared) + usage.get("SHARED", 0), mma)


def _measure_one(spec: Spec) -> tuple:
    """Worker: plain values (compiled kernels do not pickle)."""
    r = compile_spec(spec)
    return r.registers, r.stack, r.local, r.shared, r.ptx_mma


def measure_all(specs: list[Spec], workers: int | None = None) -> list[Result]:
    """Compile every spec, ``workers`` processes at a time (default: the CPU count, at most 4).

    Each compile is single-threaded LLVM + ptxas work of about a second; Triton caches them on disk. Workers are
    spawned, not forked, so they start without the parent's threads, and import Triton in compile mode."""
    import concurrent.futures
    import multiprocessing

    workers = workers or min(4, os.cpu_count() or 1)
    saved = os.environ.get("TRITON_INTERPRET")
    # a test session may have set TRITON_INTERPRET=1 for interpreter tests; the workers must compile
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        if workers <= 1:
            values = [_measure_one(s) for s in specs]
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                values = list(pool.map(_measure_one, specs, chunksize=4))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return [Result(s, *v) for s, v in zip(specs, values)]
