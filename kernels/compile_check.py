"""Compiling the Triton kernels of kernels/ for real GPU targets, on a machine without a GPU.

Triton compiles for any CUDA target without a device: a compile-only driver answers the target
(GPUTarget("cuda", 90, 32) for sm_90), every kernel launch becomes a compile (`warmup=True`), and the
autotuner's benchmarker only compiles each config (among the candidates kernels/tuning.py gives that
architecture). Each compiled kernel gives its shared memory (`metadata.shared`) and, from its cubin through
the cuobjdump shipped in the triton wheel, its registers and stack (register spills). `bench/gpu_compile.py`
runs the ops through this and prints the table; tests/kernels/test_gpu_compile.py checks the verdict.
Run with TRITON_INTERPRET unset (Triton decides at decoration time whether a kernel is interpreted); the
compile-only driver is active only inside `compile_only()`.
"""
import contextlib
import os
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from kernels.tuning import candidates_for_arch

# Largest dynamic shared memory per block (opt-in), bytes: A100, H100, B200.
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024), "sm_100": (100, 227 * 1024)}


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


def _autotuners() -> list:
    """Every autotuned kernel of kernels/ (importing the kernel modules registers them)."""
    import kernels.conv.triton_conv  # noqa: F401
    import kernels.diagonal_scan.fused_recurrent  # noqa: F401
    import kernels.gated_delta_rule.fused_recurrent  # noqa: F401
    import kernels.gla.fused_recurrent  # noqa: F401
    import kernels.norm.triton_norm  # noqa: F401
    import kernels.rotary.triton_rotary  # noqa: F401
    from kernels.tuning import AUTOTUNERS
    return AUTOTUNERS


class _NotCompiled:
    """What a launch returns in count_only mode: no shared memory, so every candidate "fits"."""
    class metadata:
        shared = 0


_NOT_COMPILED = _NotCompiled()


def _variant_key(jit_fn, args: tuple, kwargs: dict) -> tuple:
    """What makes Triton compile a kernel again: its constexprs and launch options (the config), and its
    runtime arguments' dtypes (tensors) or integer specialisations (== 1, divisible by 16)."""
    def specialisation(x):
        if isinstance(x, torch.Tensor):
            return str(x.dtype)
        if isinstance(x, bool) or not isinstance(x, int):
            return type(x).__name__ if x is not None else None
        return ("int", x == 1, x % 16 == 0)
    runtime_args = {p.name for p in jit_fn.params if not p.is_constexpr}  # the rest: constexprs, num_warps...
    return (jit_fn.__name__, tuple(specialisation(a) for a in args),
            tuple(sorted((name, specialisation(value) if name in runtime_args else repr(value))
                         for name, value in kwargs.items())))


@contextlib.contextmanager
def compile_only(target: str, quick: bool = False, count_only: bool = False):
    """Within this context every Triton launch compiles for `target` (e.g. 'sm_90') and records the compiled
    kernel in the yielded CompileLog instead of running. The previous driver and methods come back on exit.
    quick: each kernel's candidates are compiled in order up to the first that fits without spilling.
    count_only: nothing is compiled; the log records each variant a launch would compile (kernel, constexprs
    and config, argument dtypes and integer specialisations) with no resources: how many compiles the first
    call at a new shape costs."""
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
            label = _config_label(kwargs, tunables.get(id(jit_fn), set()))
            log.variants[kernel.hash] = Compiled(jit_fn.__name__, label,
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
        if count_only:
            latest[0] = log.variants.setdefault(_variant_key(self, args, kwargs), Compiled(
                self.__name__, _config_label(kwargs, tunables.get(id(self), set())), 0, 0, 0, True))
            return _NOT_COMPILED
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        latest[0] = record(self, kwargs, kernel)
        return kernel

    def first_good_config(self, kwargs):
        """--quick: compile configs in order and keep the first that fits without spilling."""
        configs = []
        for config in candidates_for_arch(self.configs, capability):
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
