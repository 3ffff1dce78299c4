"""Compile every Triton kernel of kernels/ for real GPU targets, on a machine without a GPU.

Triton compiles for any CUDA target without a device: a compile-only driver answers the target
(GPUTarget("cuda", 90, 32) for sm_90), every kernel launch becomes a compile (`warmup=True`), and the
autotuner's benchmarker only compiles each config. The public Triton entry points run forward and backward
on small CPU tensors at the presets' head dims, so exactly the kernels (and autotune configs) training would
launch get compiled. Each compiled kernel gives its shared memory (`metadata.shared`) and, from its cubin
through the cuobjdump shipped in the triton wheel, its registers and stack (register spills).

A kernel passes on a target when it compiles and at least one config fits the target's shared memory
without spilling. The table (op, dtype, target, K, V, kernel, registers, stack, shared bytes, configs that
fit / compiled) is printed and saved as JSON under bench/results/; the exit status is 1 when a kernel fails.

    python -m bench.gpu_compile                       # all targets, presets' shapes, bf16 and fp32
    python -m bench.gpu_compile --quick               # the CI set (tests/kernels/test_gpu_compile.py)
    python -m bench.gpu_compile --targets sm_90 --ops gated_delta_rule --shapes 256x512 128x64 --dtypes bf16

Configs: by default every autotune config is compiled (what autotuning on the GPU would do). --quick
stops at each kernel's first config that fits and does not spill (the configs are listed safest first),
which gives the same verdict for a fraction of the compiles.

Run with TRITON_INTERPRET unset (Triton decides at decoration time whether a kernel is interpreted); the
compile-only driver is active only inside `compile_only()`.
"""
import argparse
import contextlib
import datetime
import glob
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

RESULTS_DIR = ROOT / "bench" / "results"
# Largest dynamic shared memory per block (opt-in), bytes: A100, H100, B200.
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024), "sm_100": (100, 227 * 1024)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Ops by the mixer that runs them; 'gla_scalar' is chunk_gla with a [B, T, H] gate (Mamba2).
MIXER_OPS = {"gla": "gla", "mamba2": "gla_scalar", "gated_deltanet": "gated_delta_rule"}


def preset_shapes() -> dict[str, list[tuple[int, int]]]:
    """(K, V) head dims of every recurrent mixer of the model presets (configs/model), by op."""
    from omegaconf import OmegaConf

    from model.config import ModelConfig
    shapes: dict[str, set] = {op: set() for op in MIXER_OPS.values()}
    for path in sorted(glob.glob(str(ROOT / "configs" / "model" / "*.yaml"))):
        c = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
        mixers = set(c.layer_mixers())
        if "gla" in mixers:
            g = c.gla
            shapes["gla"].add((int(c.d_model * g.expand_k) // g.num_heads, int(c.d_model * g.expand_v) // g.num_heads))
        if "mamba2" in mixers:
            shapes["gla_scalar"].add((c.mamba2.d_state, c.mamba2.head_dim))
        if "gated_deltanet" in mixers:
            d = c.gated_deltanet
            shapes["gated_delta_rule"].add((d.head_dim, int(d.head_dim * d.expand_v)))
    return {op: sorted(s) for op, s in shapes.items()}


# ---- the compile-only driver ----------------------------------------------------------------------

class _DeviceProperties:
    def __init__(self, max_shared_mem: int):
        self.properties = {"max_shared_mem": max_shared_mem}

    def get_device_properties(self, device):
        return self.properties


@dataclass
class Compiled:
    """One compiled kernel variant (one autotune config at one shape)."""
    kernel: str
    config: str
    registers: int
    stack: int  # bytes per thread: register spills (and local arrays)
    shared: int  # bytes of shared memory per block
    fits: bool


@dataclass
class CompileLog:
    target: str
    max_shared: int
    variants: dict = field(default_factory=dict)  # CompiledKernel.hash -> Compiled


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line for item in line.split())
    return int(fields["REG"]), int(fields["STACK"])


def _config_label(kwargs: dict, tunables: set) -> str:
    items = [f"{name}={kwargs[name]}" for name in sorted(tunables) if name in kwargs]
    items += [f"{name}={kwargs[name]}" for name in ("num_warps", "num_stages") if name in kwargs]
    return ",".join(items) or "-"


def _autotuners():
    """Every autotuned kernel of kernels/ (the modules define them at import)."""
    import triton

    from kernels.gated_delta_rule import fused_recurrent as gdr_recurrent, triton_chunk as gdr_chunk
    from kernels.gla import fused_recurrent as gla_recurrent, triton_chunk as gla_chunk
    return [obj for module in (gdr_chunk, gdr_recurrent, gla_chunk, gla_recurrent) for obj in vars(module).values()
            if isinstance(obj, triton.runtime.Autotuner)]


@contextlib.contextmanager
def compile_only(target: str, quick: bool = False):
    """Within this context every Triton launch compiles for `target` (e.g. 'sm_90') and records the compiled
    kernel in the yielded CompileLog instead of running. The previous driver and methods come back on exit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    capability, max_shared = TARGETS[target]
    log = CompileLog(target, max_shared)
    autotuners = _autotuners()
    tunables = {id(a.fn): {name for c in a.configs for name in c.kwargs} for a in autotuners}

    def record(jit_fn, kwargs, kernel) -> Compiled:
        if kernel.hash not in log.variants:
            registers, stack = _resource_usage(kernel.asm["cubin"])
            log.variants[kernel.hash] = Compiled(jit_fn.__name__, _config_label(kwargs, tunables.get(id(jit_fn), set())),
                                                 registers, stack, kernel.metadata.shared,
                                                 kernel.metadata.shared <= max_shared)
        return log.variants[kernel.hash]

    def benchmark(kernel_call, quantiles=None, **kwargs):
        """The autotuner's timing of a config: compile it; prefer configs that fit, then fewer spills."""
        kernel_call()
        c = latest[0]
        score = c.stack + 1.0 if c.fits else float("inf")
        return [score] * len(quantiles) if quantiles else score

    class CompileOnlyDriver(DriverBase):
        def __init__(self):
            self.utils = _DeviceProperties(max_shared)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return capability  # one kernel cache per target: JITFunction caches by device

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            return benchmark

    latest: list[Compiled] = [None]
    jit_run, prune_configs = JITFunction.run, Autotuner.prune_configs

    def compile_run(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        latest[0] = record(self, kwargs, kernel)
        return kernel

    def first_good_config(self, kwargs):
        """--quick: compile configs in order and keep the first that fits without spilling."""
        configs = []
        for config in self.configs:
            self.fn.run(*self.nargs.values(), **{**kwargs, "warmup": True}, **config.all_kwargs())
            configs.append(config)
            if latest[0].fits and latest[0].stack == 0:
                return [config]
        return configs

    drivers = triton.runtime.driver
    previous_driver = drivers._active  # not `.active`: without a GPU that would fail to create the default
    saved = [(a, a.cache, a.__dict__.get("do_bench")) for a in autotuners]
    try:
        drivers.set_active(CompileOnlyDriver())
        JITFunction.run = compile_run
        if quick:
            Autotuner.prune_configs = first_good_config
        for a in autotuners:  # tune afresh for this target, with the compile-only benchmarker
            a.cache = {}
            a.__dict__.pop("do_bench", None)
        yield log
    finally:
        JITFunction.run, Autotuner.prune_configs = jit_run, prune_configs
        drivers._active = previous_driver
        for a, cache, do_bench in saved:
            a.cache = cache
            a.__dict__.pop("do_bench", None)
            if do_bench is not None:
                a.__dict__["do_bench"] = do_bench


# ---- the ops, through their public Triton entry points --------------------------------------------

def _inputs(op: str, K: int, V: int, dtype: torch.dtype, B: int = 1, T: int = 64, H: int = 2) -> dict:
    rand = lambda *shape: torch.randn(*shape)  # noqa: E731
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    if op == "gated_delta_rule":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = dict(g=F.logsigmoid(rand(B, T, H)), beta=torch.sigmoid(rand(B, T, H)))
    else:
        gates = dict(g=F.logsigmoid(rand(B, T, H) if op == "gla_scalar" else rand(B, T, H, K)))
    inputs = dict(q=q, k=k, v=v, **gates)
    inputs = {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}
    inputs["initial_state"] = torch.randn(B, H, K, V, requires_grad=True)
    return inputs


def _entry_points(op: str):
    """(chunk, fused recurrent) Triton entry points of an op."""
    if op == "gated_delta_rule":
        from kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_triton
        from kernels.gated_delta_rule.triton_chunk import chunk_gated_delta_rule_triton
        return chunk_gated_delta_rule_triton, fused_recurrent_gated_delta_rule_triton
    from kernels.gla.fused_recurrent import fused_recurrent_gla_triton
    from kernels.gla.triton_chunk import chunk_gla_triton
    return chunk_gla_triton, fused_recurrent_gla_triton


def run_op(op: str, K: int, V: int, dtype: torch.dtype) -> None:
    """Forward (chunk and fused recurrent, with initial and final state) and backward of one op."""
    for fn in _entry_points(op):
        o, final = fn(**_inputs(op, K, V, dtype), output_final_state=True)
        torch.autograd.backward([o, final], [torch.ones_like(o), torch.ones_like(final)])


# ---- the check ------------------------------------------------------------------------------------

def check_case(case: dict, quick: bool) -> list[dict]:
    """One row per kernel of a case (a dict of target, op, dtype, K and V): the best config's resources and the
    configs that fit; a compile error is one row saying so (it fails the check, the other cases still run)."""
    try:
        with compile_only(case["target"], quick) as log:
            run_op(case["op"], case["K"], case["V"], DTYPES[case["dtype"]])
    except Exception as e:
        return [dict(case, kernel="-", error=f"{type(e).__name__}: {e}".splitlines()[0])]
    return _summarise(case, log)


def check(cases: list[dict], quick: bool, jobs: int = 1) -> list[dict]:
    """The rows of every case, printed as they come. With jobs > 1 the cases run in that many processes
    (compiling is single-threaded; compile_only patches Triton for its whole process, so one case each)."""
    rows = []
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                           max_tasks_per_child=1))
            results = pool.map(check_case, cases, itertools.repeat(quick))
        else:
            results = map(check_case, cases, itertools.repeat(quick))
        for case_rows in results:
            print(_format_rows(case_rows), flush=True)
            rows += case_rows
    return rows


def quick_cases(shapes: dict, targets=tuple(TARGETS), dtypes=("bf16",)) -> list[dict]:
    """The CI set: every target (sm_80, sm_90, sm_100), bf16 (what training feeds the kernels), each op at its
    largest preset shape (the most registers and shared memory; GLA and Gated DeltaNet K=256, V=512, Mamba2
    K=128, V=64). fp32 inputs (exact fp32 dots, no tensor cores) spill at these shapes: see the README."""
    return [dict(target=t, op=op, dtype=d, K=K, V=V) for t in targets for d in dtypes
            for op, s in shapes.items() for K, V in [max(s, key=lambda kv: kv[0] * kv[1])]]


def _summarise(case: dict, log: CompileLog) -> list[dict]:
    by_kernel: dict[str, list[Compiled]] = {}
    for c in log.variants.values():
        by_kernel.setdefault(c.kernel, []).append(c)
    rows = []
    for kernel, variants in sorted(by_kernel.items()):
        fitting = [c for c in variants if c.fits]
        best = min(fitting or variants, key=lambda c: (not c.fits, c.stack, c.registers, c.shared))
        rows.append(dict(case, kernel=kernel, config=best.config, registers=best.registers, stack=best.stack,
                         shared=best.shared, fit=len(fitting), spill_free=sum(c.stack == 0 for c in fitting),
                         compiled=len(variants), max_stack=max(c.stack for c in fitting) if fitting else None,
                         max_shared=max(c.shared for c in variants),
                         variants=[asdict(c) for c in variants]))
    return rows


def failures(rows: list[dict]) -> list[str]:
    """Why the check fails: compile errors, kernels with no config that fits, kernels whose fitting configs
    all spill."""
    out = []
    for r in rows:
        where = f"{r['kernel']} {r['target']} {r['op']} {r['dtype']} K={r['K']} V={r['V']}"
        if "error" in r:
            out.append(f"{where}: {r['error']}")
        elif not r["fit"]:
            out.append(f"{where}: no config fits {TARGETS[r['target']][1]} bytes of shared memory "
                       f"(smallest needs {r['shared']})")
        elif not r["spill_free"]:
            out.append(f"{where}: every fitting config spills (least: {r['stack']} bytes of stack)")
    return out


def _format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['target']:7}{r['op']:17}{r['dtype']:5}{r['K']:>4}x{r['V']:<4} ERROR {r['error']}")
            continue
        lines.append(f"{r['target']:7}{r['op']:17}{r['dtype']:5}{r['K']:>4}x{r['V']:<4} {r['kernel']:34}"
                     f"{r['registers']:>5}{r['stack']:>7}{r['shared']:>8}  {r['spill_free']:>2}/{r['fit']:>2}/"
                     f"{r['compiled']:<3} {r['config']}")
    return "\n".join(lines)


HEADER = (f"{'target':7}{'op':17}{'dtype':5}{'K x V':10}{'kernel':34}{'regs':>5}{'stack':>7}{'shared':>8}"
          "  spill-free/fit/compiled, best config")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--ops", nargs="+", choices=sorted(set(MIXER_OPS.values())), default=sorted(set(MIXER_OPS.values())))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 and fp32 (--quick: bf16)")
    p.add_argument("--shapes", nargs="+", metavar="KxV", help="head dims for every op (default: the presets')")
    p.add_argument("--quick", action="store_true",
                   help="the CI set (see quick_cases), stopping at each kernel's first config that fits unspilled")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="cases compiled at once (default: one per core)")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/gpu_compile_<date>.json)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("TRITON_INTERPRET is set: compiled kernels need it unset")
    try:
        shapes = ({op: [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes] for op in args.ops}
                  if args.shapes else preset_shapes())
    except ValueError:
        p.error(f"--shapes takes KxV pairs such as 256x512, got {args.shapes}")
    if args.quick:
        cases = quick_cases({op: shapes[op] for op in args.ops}, args.targets, args.dtypes or ("bf16",))
    else:
        cases = [dict(target=t, op=op, dtype=d, K=K, V=V) for t in args.targets for op in args.ops
                 for d in args.dtypes or DTYPES for K, V in shapes[op]]

    print(HEADER, flush=True)
    rows = check(cases, quick=args.quick, jobs=args.jobs)
    import triton
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  triton=triton.__version__, torch=torch.__version__, quick=args.quick,
                  max_shared={t: TARGETS[t][1] for t in sorted({c["target"] for c in cases})}, rows=rows)
    out = args.out or RESULTS_DIR / f"gpu_compile_{datetime.datetime.now():%Y%m%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    bad = failures(rows)
    for line in bad:
        print(f"FAIL {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
