"""Mesh layout checks, and building the model: meta device -> FSDP2/HSDP shards -> the single-process
initial weights, with no rank ever allocating more than its shards; one HSDP optimizer step equals one
single-process step."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from configs.schema import OptimConfig
from model import LM
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.engine import Engine
from parallel.topology import Topology, init_topology
from parallel.fsdp import apply_fsdp
from parallel.materialize import build_model
from parallel.mesh import ParallelDims, build_mesh, fsdp_mesh

TINY = dict(vocab_size=96, d_model=32, pattern="GMDAX", gla=dict(num_heads=2, use_short_conv=True),
            mamba2=dict(head_dim=16, d_state=8), gated_deltanet=dict(num_heads=2, head_dim=8), mlstm=dict(num_heads=2),
            attention=dict(num_heads=2), tie_embeddings=True)


def test_mesh_dims_resolve_and_reject_wrong_products():
    assert ParallelDims.resolve(1, -1, 2, world_size=8) == ParallelDims(1, 4, 2, 8)
    assert ParallelDims.resolve(2, 2, 2, world_size=8).dp == 4
    with pytest.raises(ValueError, match="must equal the world size 8"):
        ParallelDims.resolve(1, 3, 2, world_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims.resolve(1, -1, 3, world_size=8)


@pytest.mark.parametrize("fields, key", [
    (dict(zero_stage=4), "zero_stage"),
    (dict(engine="deepspeed", dp_replicate=2), "dp_replicate"),
    (dict(engine="ddp"), "parallel.engine"),
    (dict(dp_shard=0), "parallel.dp_shard"),
])
def test_bad_parallel_config_names_the_key(fields, key):
    with pytest.raises(ValueError, match=key):
        ParallelConfig(**fields)


def test_distributed_engines_need_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="needs torchrun"):
        init_topology(ParallelConfig(engine="fsdp"))
    with pytest.raises(ValueError, match="world size 1"):
        init_topology(ParallelConfig(sp=2))


def test_meta_build_gives_the_seeded_single_process_weights():
    model = build_model(TINY, torch.device("cpu"), seed=3)
    reference = LM.from_config(TINY)
    torch.manual_seed(3)
    reference.init_weights()
    assert model.lm_head.weight is model.embed.weight  # tying survives materialisation
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def fixed_batch_step(engine: Engine) -> float:
    """One optimizer step on a fixed batch (the same on every rank); returns the loss."""
    tokens = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    logits = engine.model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    engine.backward(loss)
    engine.step(lr=1e-2)
    return loss.item()


def run_sharded_build(rank: int, world_size: int) -> None:
    # HSDP: 2 replicas x 2 shards, with activation checkpointing.
    mesh = build_mesh(ParallelDims.resolve(2, 2, 1, world_size), "cpu")
    cfg = ParallelConfig(engine="fsdp", dp_replicate=2, dp_shard=2, activation_checkpointing="full")

    def shard(model) -> None:  # as parallel/build.py does
        apply_activation_checkpointing(model, cfg)
        apply_fsdp(model, fsdp_mesh(mesh), cfg, torch.device("cpu"))

    model = build_model(TINY, torch.device("cpu"), seed=3, shard=shard)
    reference = build_model(TINY, torch.device("cpu"), seed=3)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in reference.parameters())
    assert local <= total / 2 + 2 * 64, f"rank {rank} holds {local} of {total} parameter values"
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert isinstance(param, DTensor), name
        assert torch.equal(param.full_tensor(), expected), name

    optim = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.5)  # the clip is active at this lr
    sharded, single = Engine(model, optim, Topology()), Engine(reference, optim, Topology())
    assert fixed_batch_step(sharded) == pytest.approx(fixed_batch_step(single), rel=1e-6)
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.full_tensor(), expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} after one step: {m}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hsdp_build_is_sharded_and_steps_like_one_process(spawn):
    spawn(run_sharded_build, 4)
