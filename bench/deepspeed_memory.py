"""Peak host memory (RSS) per rank of a DeepSpeed engine, or of FSDP2 for comparison: the model build, the
engine's construction (deepspeed.initialize: ZeRO partitioning, optimizer states), then training steps.

Run under torchrun; every rank builds the engine `parallel=` names for the given config overrides (default:
the 370M GLA hybrid, ZeRO-3), trains `--steps` steps on random tokens (the step of train.py: forward with the
fused loss, backward, optimizer step) and reports its resident-set peaks, as growth over the RSS before the
build: `build` is the peak up to the call of deepspeed.initialize (the model as handed to DeepSpeed; DeepSpeed
only), `engine` the peak over the whole construction, `train` the peak up to the end of the last step, `max RSS`
the process's peak resident set, imports included (what train.py logs as peak memory on CPU). The kernel's
high-water mark (VmHWM) is reset first, so the imports do not count in the growths. CPU only (gloo); figures are
bytes of host memory, not of an accelerator. Prints a table and writes JSON (versions, date, world size,
overrides, results) to bench/results/.

    torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory
    torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory parallel=fsdp   # the same run on FSDP2
    torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory model=gla_hybrid_125m parallel=deepspeed_zero2
    torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory --tag before   # in the JSON's name
    MALLOC_MMAP_THRESHOLD_=131072 torchrun ...   # glibc returns every freed block: RSS follows live memory
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from bench.common import write_results
from configs.schema import load_config
from parallel.build import build_engine
from parallel.topology import init_topology
from training.metrics import peak_memory_gib, process_memory_bytes, reset_peak_memory
from training.optim import lr_at

DEFAULTS = ["model=gla_hybrid_370m", "model.vocab_size=32000", "parallel=deepspeed_zero3", "train.global_batch_size=2",
            "train.micro_batch_size=1", "logging.wandb.mode=disabled"]
MiB = 2 ** 20


def random_batch(cfg, generator: torch.Generator) -> dict:
    """One micro-batch of random tokens, one document per row, as the loader shapes it."""
    rows, length = cfg.train.micro_batch_size, cfg.train.seq_len
    tokens = torch.randint(cfg.model.vocab_size, (rows, length + 1), generator=generator)
    return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                cu_seqlens=torch.arange(0, rows * length + 1, length, dtype=torch.int32))


def main():
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run under torchrun: torchrun --standalone --nproc_per_node=2 -m bench.deepspeed_memory")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default="", help="added to the JSON file's name")
    parser.add_argument("--steps", type=int, default=2, help="training steps after the build (0: the build only)")
    args, extra = parser.parse_known_args()
    overrides = DEFAULTS + extra
    cfg, _ = load_config(overrides)
    topology = init_topology(cfg.parallel)

    marks = {}
    if topology.engine == "deepspeed":  # the peak of the model build: read when it is handed to deepspeed.initialize
        import parallel.deepspeed as ds_engine

        initialize = ds_engine.deepspeed.initialize

        def marked_initialize(*args, **kwargs):
            marks["build_peak"] = process_memory_bytes("VmHWM")
            return initialize(*args, **kwargs)

        ds_engine.deepspeed.initialize = marked_initialize
    dist.barrier()
    reset_peak_memory()
    before = process_memory_bytes("VmRSS")
    engine = build_engine(cfg, topology)
    engine_peak = process_memory_bytes("VmHWM")
    micro_steps = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topology.dp_size)
    generator = torch.Generator().manual_seed(cfg.run.seed + topology.rank)
    for step in range(args.steps):
        for _ in range(micro_steps):
            batch = random_batch(cfg, generator)
            loss = engine.model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], labels=batch["labels"])
            engine.backward(loss / micro_steps)
        engine.step(lr_at(step, cfg.train.max_steps, cfg.optim))
    result = dict(rank=topology.rank, rss_before=before, build_peak_growth=marks.get("build_peak", before) - before,
                  engine_peak_growth=engine_peak - before, train_peak_growth=process_memory_bytes("VmHWM") - before,
                  rss_after_growth=process_memory_bytes("VmRSS") - before,
                  max_rss=peak_memory_gib(topology.device) * 2 ** 30)
    # ZeRO-3's partitioned parameters give their count as ds_numel; FSDP2's DTensors count whole.
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.model.parameters())
    results = [None] * topology.world_size
    dist.all_gather_object(results, result)

    if topology.is_main:
        name = f"ZeRO-{cfg.parallel.zero_stage}" if topology.engine == "deepspeed" else topology.engine
        print(f"{cfg.model.name}: {numel / 1e6:.1f}M parameters, {numel * 4 / MiB:.0f} MiB in fp32; {name} on "
              f"{topology.world_size} ranks, {args.steps} steps (growth over the RSS before the build)")
        print(f"{'rank':>4} {'build peak MiB':>15} {'engine peak MiB':>16} {'train peak MiB':>15} {'after MiB':>10} "
              f"{'max RSS MiB':>12}")
        for r in results:
            print(f"{r['rank']:>4} {r['build_peak_growth'] / MiB:>15.0f} {r['engine_peak_growth'] / MiB:>16.0f} "
                  f"{r['train_peak_growth'] / MiB:>15.0f} {r['rss_after_growth'] / MiB:>10.0f} "
                  f"{r['max_rss'] / MiB:>12.0f}")
        report = dict(engine=topology.engine, world_size=topology.world_size, overrides=overrides, steps=args.steps,
                      parameters=numel, fp32_model_bytes=numel * 4, results=results)
        if topology.engine == "deepspeed":
            report["deepspeed"] = ds_engine.deepspeed.__version__
        write_results("deepspeed_memory" + (f"_{args.tag}" if args.tag else ""), report)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
