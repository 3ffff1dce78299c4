"""Autotuning of every Triton kernel of kernels/: few candidates, chosen per GPU architecture, cached on disk.

Each kernel lists its candidate configs with the heuristic config first. Which of them are tried:
- BATON_AUTOTUNE=0 (read when the kernels are first imported): the first config only, no tuning at all;
- the interpreter (TRITON_INTERPRET=1, the CPU tests): the first config (timings mean nothing there; the
  tests run every candidate through `pinned_config`);
- sm_90: the first config only. On an H200 with triton 3.6 the gated delta rule died with an illegal memory
  access under autotuning and trained with every kernel on its first config; until a GPU run shows another
  candidate to be safe on triton 3.6 and 3.7, Hopper runs the configs known to work;
- every other architecture: every candidate that fits the device's shared memory. Configs over it could only
  fail at launch, so each one is compiled first (what benchmarking it does first anyway) and dropped.
The tuning key is the heads and head dims (never T or the batch), and the winner is cached on disk in
Triton's cache directory, so a restarted job (or another node sharing the cache) does not tune again.
"""
import contextlib
import functools
import inspect
import os

import triton

from kernels.backend import interpret_mode

AUTOTUNE_ENV = "BATON_AUTOTUNE"
FIRST_CONFIG_ONLY_ARCHS = {90}

AUTOTUNERS: list = []  # every autotuned kernel, for the tests (pinned_config) and bench/gpu_compile.py


def autotune_enabled() -> bool:
    value = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"{AUTOTUNE_ENV}={value!r}: expected 0 or 1")
    return value in ("1", "true", "on", "yes")


def candidates_for_arch(configs: list, arch: int) -> list:
    """The candidates an architecture (compute capability as 80, 90, ...) tries, heuristic config first."""
    return configs[:1] if arch in FIRST_CONFIG_ONLY_ARCHS else list(configs)


def _prune(kernel, configs: list, named_args: dict, **kwargs) -> list:
    """The candidates of the active device's architecture whose compiled kernel fits its shared memory; if
    none does, the least demanding one, so the launch fails with Triton's error naming the sizes."""
    driver = triton.runtime.driver.active
    configs = candidates_for_arch(configs, driver.get_current_target().arch)
    if len(configs) == 1:
        return configs
    max_shared = driver.utils.get_device_properties(driver.get_current_device())["max_shared_mem"]
    compile_kwargs = {**kwargs, "warmup": True}
    shared = {c: kernel.run(*named_args.values(), **compile_kwargs, **c.all_kwargs()).metadata.shared
              for c in configs}
    return [c for c in configs if shared[c] <= max_shared] or [min(configs, key=shared.get)]


_CACHES_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters  # triton >= 3.2


def autotune(configs: list, key: list[str]):
    """triton.autotune over `configs` (the heuristic config first) with this tuning key (heads and head dims
    only), among the candidates of the device's architecture that fit it. The candidates stay on the
    autotuner as `.candidates`."""
    def decorate(kernel):
        if interpret_mode() or not autotune_enabled():
            tuner = triton.autotune(configs=configs[:1], key=key)(kernel)
        else:
            options = {"cache_results": True} if _CACHES_RESULTS else {}
            prune = {"early_config_prune": functools.partial(_prune, kernel)}
            tuner = triton.autotune(configs=configs, key=key, prune_configs_by=prune, **options)(kernel)
        tuner.candidates = list(configs)
        AUTOTUNERS.append(tuner)
        return tuner
    return decorate


@contextlib.contextmanager
def pinned_config(index: int):
    """Within this context every autotuned kernel runs its candidate `index` (its last one when it has
    fewer), untuned: the tests run each candidate of each kernel against the reference this way."""
    saved = [(tuner, tuner.configs, tuner.cache) for tuner in AUTOTUNERS]
    try:
        for tuner in AUTOTUNERS:
            tuner.configs, tuner.cache = [tuner.candidates[min(index, len(tuner.candidates) - 1)]], {}
        yield
    finally:
        for tuner, configs, cache in saved:
            tuner.configs, tuner.cache = configs, cache
