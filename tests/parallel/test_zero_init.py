"""DeepSpeed ZeRO-3 builds the model partitioned: on 2 ranks, right after the engine's build every parameter
holds only its ZeRO-3 partition, the build's peak memory stays well below one whole model, and the gathered
weights are exactly the seeded single-process ones (parallel/materialize.py)."""
import math

import pytest
import torch

WORLD_SIZE = 2
# 28M parameters (106 MiB in fp32), so that the build's memory stands out of the noise; the largest module
# (an MLP projection, ~3 MB) is small next to half the model.
OVERRIDES = ["parallel=deepspeed_zero3", "model.vocab_size=1024", "model.d_model=512", "model.pattern=GGGA",
             "model.n_layers=8", "train.global_batch_size=2", "train.micro_batch_size=1"]


def run_zero3_build(rank: int, world_size: int) -> None:
    import deepspeed

    from configs.schema import load_config
    from parallel.deepspeed import build_zero_model, deepspeed_config
    from parallel.materialize import build_model
    from parallel.topology import init_topology
    from training.metrics import process_memory_bytes, reset_peak_memory

    cfg, _ = load_config(OVERRIDES)
    topology = init_topology(cfg.parallel)  # finds the harness's gloo group joined
    deepspeed.init_distributed(dist_backend="gloo")  # deepspeed.comm over that group
    config = deepspeed_config(cfg, topology, micro_steps=1)
    warm_up, _ = load_config(OVERRIDES + ["model.d_model=64"])  # the imports and first collectives, not measured
    build_zero_model(warm_up, topology, config)

    reset_peak_memory()
    before = process_memory_bytes("VmRSS")
    model, groups = build_zero_model(cfg, topology, config)
    build_peak = process_memory_bytes("VmHWM") - before

    numel = sum(p.ds_numel for p in model.parameters())
    for name, param in model.named_parameters():
        assert param.numel() == 0, f"{name}: {param.numel()} values held whole after the build"
        assert param.ds_tensor.numel() == math.ceil(param.ds_numel / world_size), name
    # Observed 0.62 of the whole model (half of it, plus one module whole and the collectives' buffers);
    # a whole build (ZeRO-1/2, and ZeRO-3 before parallel/deepspeed.py partitioned at build time): 1.01.
    assert build_peak < 0.8 * numel * 4, f"rank {rank}: build peak {build_peak / 2**20:.1f} MiB, " \
                                         f"whole model {numel * 4 / 2**20:.1f} MiB"
    assert model.lm_head.weight is model.embed.weight  # tying survives the partitioning
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # The decay split saw the whole shapes (the partitioned parameters are 1-D): matrices decay, the rest not.
    assert [g["weight_decay"] > 0 for g in groups] == [True, False]
    assert all(len(p.ds_shape) >= 2 for p in groups[0]["params"])
    assert all(len(p.ds_shape) == 1 for p in groups[1]["params"])

    reference = build_model(cfg.model, torch.device("cpu"), cfg.run.seed)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for (name, param), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(param, expected), name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_build_is_partitioned_and_seeded(monkeypatch, spawn):
    # glibc keeps freed heap blocks resident; a fixed mmap threshold returns every large block on free, so
    # that the RSS peak is the build's live memory rather than the allocator's reserve.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    spawn(run_zero3_build, WORLD_SIZE)
