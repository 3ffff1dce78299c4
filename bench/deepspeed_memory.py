"""Peak host memory (RSS) per rank while the DeepSpeed engine is built: the model build, then
deepspeed.initialize (ZeRO partitioning, optimizer states).

Run under torchrun; every rank builds `DeepSpeedEngine` for the given config overrides (default: the
370M GLA hybrid, ZeRO-3) and reports its resident-set peaks, as growth over the RSS before the build:
`build` is the peak up to the call of deepspeed.initialize (the model as handed to DeepSpeed), `engine`
the peak over the whole construction. The kernel's high-water mark (VmHWM) is reset first, so the
imports do not count. CPU only (gloo); figures are bytes of host memory, not of an accelerator.
Prints a table and writes JSON (versions, date, world size, overrides, results) to bench/results/.

    torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory
    torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory model=gla_hybrid_125m parallel=deepspeed_zero2
    torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory --tag before   # in the JSON's name
    MALLOC_MMAP_THRESHOLD_=131072 torchrun ...   # glibc returns every freed block: RSS follows live memory
"""
import argparse
import os
import sys

import torch.distributed as dist

import parallel.deepspeed as ds_engine
from bench.common import write_results
from configs.schema import load_config
from parallel.topology import init_topology
from training.metrics import process_memory_bytes, reset_peak_memory

DEFAULTS = ["model=gla_hybrid_370m", "model.vocab_size=32000", "parallel=deepspeed_zero3", "train.global_batch_size=2",
            "train.micro_batch_size=1", "logging.wandb.mode=disabled"]
MiB = 2 ** 20


def main():
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run under torchrun: torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default="", help="added to the JSON file's name")
    args, extra = parser.parse_known_args()
    overrides = DEFAULTS + extra
    cfg, _ = load_config(overrides)
    topology = init_topology(cfg.parallel)

    # The peak of the model build: read when the engine hands the model to deepspeed.initialize.
    initialize, marks = ds_engine.deepspeed.initialize, {}

    def marked_initialize(*args, **kwargs):
        marks["build_peak"] = process_memory_bytes("VmHWM")
        return initialize(*args, **kwargs)

    ds_engine.deepspeed.initialize = marked_initialize
    dist.barrier()
    reset_peak_memory()
    before = process_memory_bytes("VmRSS")
    engine = ds_engine.DeepSpeedEngine(cfg, topology)
    result = dict(rank=topology.rank, rss_before=before, build_peak_growth=marks["build_peak"] - before,
                  engine_peak_growth=process_memory_bytes("VmHWM") - before, rss_after_growth=process_memory_bytes("VmRSS") - before)
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
        report = dict(deepspeed=ds_engine.deepspeed.__version__, world_size=topology.world_size, overrides=overrides,
                      parameters=numel, fp32_model_bytes=numel * 4, results=results)
        write_results("deepspeed_memory" + (f"_{args.tag}" if args.tag else ""), report)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
