"""parallel.activation_checkpointing in the single-process engine (FSDP2 and DeepSpeed call the same function,
parallel/activation_checkpointing.py; tests/parallel/test_engines.py runs FSDP2 with it): every mode gives the
same losses as none, and keeps less for the backward, full least; old boolean values still work."""
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from configs.errors import ConfigError
from configs.schema import load_config
from model.memory import saved_bytes
from parallel.activation_checkpointing import checkpointed_blocks
from parallel.build import build_engine
from parallel.topology import Topology

# Every mixer, four blocks: selective (every 2nd) wraps blocks 1 and 3.
TINY = ["model.vocab_size=96", "model.d_model=32", "model.pattern=GMDA", "model.n_layers=4", "model.gla.num_heads=2",
        "model.mamba2.head_dim=16", "model.mamba2.d_state=8", "model.gated_deltanet.num_heads=2",
        "model.gated_deltanet.head_dim=8", "model.attention.num_heads=2", "train.seq_len=64"]
STEPS = 2


def train_steps(mode: str) -> tuple[list[float], int, list[int]]:
    """Losses of STEPS optimizer steps, bytes saved by the first forward, and which blocks are wrapped."""
    cfg, _ = load_config(TINY + [f"parallel.activation_checkpointing={mode}"])
    engine = build_engine(cfg, Topology())
    wrapped = [i for i, block in enumerate(engine.model.blocks) if isinstance(block, CheckpointWrapper)]
    tokens = torch.randint(0, 96, (2, 65), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, 20, 64, 100, 128], dtype=torch.int32)  # packed documents
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    kept = saved_bytes(engine.model, inputs, cu_seqlens, labels=labels)
    losses = []
    for _ in range(STEPS):  # the same batch: the loss must fall
        loss = engine.model(inputs, cu_seqlens, labels=labels)
        engine.backward(loss)
        engine.step(3e-3)
        losses.append(loss.item())
    return losses, kept, wrapped


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[list[float], int, list[int]]]:
    return {mode: train_steps(mode) for mode in ("none", "selective", "full")}


def test_every_mode_gives_the_same_losses(runs):
    reference = runs["none"][0]
    assert reference[-1] < reference[0]  # it trains
    for mode in ("selective", "full"):
        assert runs[mode][0] == pytest.approx(reference, rel=1e-6), mode


def test_checkpointing_keeps_less_for_the_backward(runs):
    assert [runs[mode][2] for mode in ("none", "selective", "full")] == [[], [1, 3], [0, 1, 2, 3]]
    none, selective, full = (runs[mode][1] for mode in ("none", "selective", "full"))
    assert full < selective < none
    assert full < none / 2  # each block keeps only its input; the head and loss still keep theirs


def test_selection_old_booleans_and_bad_values():
    for old, mode in (("true", "full"), ("false", "none")):  # what the boolean did under FSDP and DeepSpeed
        cfg, _ = load_config(TINY + [f"parallel.activation_checkpointing={old}"])
        assert cfg.parallel.activation_checkpointing == mode
    assert checkpointed_blocks(6, "selective", 3) == [2, 5]
    assert checkpointed_blocks(6, "selective", 1) == checkpointed_blocks(6, "full", 1) == list(range(6))
    assert checkpointed_blocks(6, "none", 2) == []
    for override, message in (("parallel.activation_checkpointing=some", "'some' is not one of none, full, selective"),
                              ("parallel.activation_checkpointing_every=0", "must be >= 1")):
        with pytest.raises(ConfigError, match=message) as err:
            load_config(TINY + [override])
        assert "\n" not in str(err.value)
