"""Autotuning of every Triton kernel of kernels/: the candidate configs, pruned to those that fit the device.

Configs that need more shared memory than the device has (multi-stage pipelines of the larger blocks) can
only fail at launch, with Triton's out-of-resources error, after autotuning has picked them or while it
benchmarks them. So each config is compiled first (compiling is what benchmarking a config does first
anyway) and the ones over the device's shared memory are dropped. `python -m bench.gpu_compile` checks, for
real GPU targets without a GPU, that every kernel keeps at least one config and that one does not spill.

Under the interpreter (TRITON_INTERPRET=1, the CPU tests) only the first config is kept: each candidate would
run in Python, and timings mean nothing there.
"""
import functools

import triton

from kernels.backend import interpret_mode


def fitting_configs(kernel, configs: list, named_args: dict, **kwargs) -> list:
    """The configs whose compiled `kernel` fits the active device's shared memory; if none does, the least
    demanding one, so the launch fails with Triton's error naming the sizes."""
    driver = triton.runtime.driver.active
    max_shared = driver.utils.get_device_properties(driver.get_current_device())["max_shared_mem"]
    compile_kwargs = {**kwargs, "warmup": True}
    shared = {c: kernel.run(*named_args.values(), **compile_kwargs, **c.all_kwargs()).metadata.shared
              for c in configs}
    return [c for c in configs if shared[c] <= max_shared] or [min(configs, key=shared.get)]


def autotune(configs: list, key: list[str]):
    """triton.autotune over `configs` (listed safest first: the interpreter keeps the first) with this tuning
    key, among the configs that fit the device."""
    def decorate(kernel):
        if interpret_mode():
            return triton.autotune(configs=configs[:1], key=key)(kernel)
        prune = {"early_config_prune": functools.partial(fitting_configs, kernel)}
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune)(kernel)
    return decorate
