"""Peak host memory (RSS) per rank while the DeepSpeed engine is built: the model build, then
deepspeed.initialize (ZeRO partitioning, optimizer states).

Run under torchrun; every rank builds `DeepSpeedEngine` for the given config overrides (default: the
370M GLA hybrid, ZeRO-3) and reports its resident-set peaks, as growth over the RSS before the build:
`build` is the peak up to the call of deepspeed.initialize (the model as handed to DeepSpeed), `engine`
the peak over the whole construction. The kernel's high-water mark (VmHWM) is reset first, so the
imports do not count. CPU only (gloo); figures are bytes of host memory, not of an accelerator.
Prints a table and writes JSON (versions, date, world size, overrides, results) to bench/results/.

    torchrun --standalone --nproc_per_node=2 bench/deepspeed_memory.py
    torchrun --standalone --nproc_per_node=2 bench/deepspeed_memory.py model=gla_hybrid_125m parallel=deepspeed_zero2
    torchrun --standalone --nproc_per_node=2 bench/deepspeed_memory.py --tag before   # in the JSON's name
    MALLOC_MMAP_THRESHOLD_=131072 torchrun ...   # glibc returns every freed block: RSS follows live memory
"""
import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import parallel.deepspeed as ds_engine  # noqa: E402
from bench.kernels import versions  # noqa: E402
from configs.schema import load_config  # noqa: E402
from parallel.topology import init_topology  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULTS = ["model=gla_hybrid_370m", "model.vocab_size=32000", "parallel=deepspeed_zero3", "train.global_batch_size=2",
            "train.micro_batch_size=1", "logging.wandb.mode=disabled"]
MiB = 2 ** 20


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def main():
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run under torchrun: torchrun --standalone --nproc_per_node=2 bench/deepspeed_memory.py")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default="", help="added to the JSON file's name")
    args, extra = parser.parse_known_args()
    overrides = DEFAULTS + extra
    cfg, _ = load_config(overrides)
    topology = init_topology(cfg.parallel)

    # The peak of the model build: read when the engine hands the model to deepspeed.initialize.
    initialize, marks = ds_engine.deepspeed.initialize, {}

    def marked_initialize(*args, **kwargs):
        marks["build_peak"] = rss_bytes("VmHWM")
        return initialize(*args, **kwargs)

    ds_engine.deepspeed.initialize = marked_initialize
    dist.barrier()
    reset_peak()
    before = rss_bytes("VmRSS")
    engine = ds_engine.DeepSpeedEngine(cfg, topology)
    result = dict(rank=topology.rank, rss_before=before, build_peak_growth=marks["build_peak"] - before,
                  engine_peak_growth=rss_bytes("VmHWM") - before, rss_after_growth=rss_bytes("VmRSS") - before)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.ds.module.parameters())
    results = [None] * topology.world_size
    dist.all_gather_object(results, result)

    if topology.is_main:
        print(f"{cfg.model.name}: {numel / 1e6:.1f}M parameters, {numel * 4 / MiB:.0f} MiB in fp32; "
              f"ZeRO-{cfg.parallel.zero_stage} on {topology.world_size} ranks (growth over the RSS before the build)")
        print(f"{'rank':>4} {'build peak MiB':>15} {'engine peak MiB':>16} {'after MiB':>10}")
        for r in results:
            print(f"{r['rank']:>4} {r['build_peak_growth'] / MiB:>15.0f} {r['engine_peak_growth'] / MiB:>16.0f} "
                  f"{r['rss_after_growth'] / MiB:>10.0f}")
        report = dict(versions=dict(versions(), deepspeed=ds_engine.deepspeed.__version__),
                      date=datetime.datetime.now().isoformat(timespec="seconds"), world_size=topology.world_size,
                      overrides=overrides, parameters=numel, fp32_model_bytes=numel * 4, results=results)
        RESULTS_DIR.mkdir(exist_ok=True)
        tag = f"_{args.tag}" if args.tag else ""
        path = RESULTS_DIR / f"deepspeed_memory{tag}_{datetime.datetime.now():%Y%m%d_%H%M%S}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
