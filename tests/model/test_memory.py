"""model/memory.py, the measure behind bench/activation_memory.py: the split by module adds up to the total,
a block measured alone keeps what it keeps inside the model (so a preset's figure is its blocks' plus the
rest), and a checkpointed block counts the input it recomputes from."""
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model.config import AttentionConfig, GatedDeltaNetConfig, GLAConfig, Mamba2Config, MLSTMConfig, RGLRUConfig
from model.memory import saved_bytes, saved_bytes_by_module
from tests.model.conftest import small_config


def test_blocks_alone_add_up_to_the_model(make_lm):
    lm = make_lm("GMDA")
    ids = torch.randint(0, 97, (2, 41))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    block_inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0].detach()))
             for block in lm.blocks]
    by_module = saved_bytes_by_module(lm, inputs, labels=labels)
    for hook in hooks:
        hook.remove()
    assert sum(by_module.values()) == saved_bytes(lm, inputs, labels=labels)
    for i, (block, x) in enumerate(zip(lm.blocks, block_inputs)):
        inside = sum(value for name, value in by_module.items() if name.startswith(f"blocks.{i}."))
        inside += by_module.get(f"blocks.{i}", 0)
        assert inside > 0 and saved_bytes(block, x.requires_grad_()) == inside, f"block {i}"


def test_a_checkpointed_block_keeps_its_input_alone(make_lm):
    block = make_lm("D").blocks[0]
    x = torch.randn(1, 64, block.mlp_norm.weight.shape[0], requires_grad=True)
    assert saved_bytes(checkpoint_wrapper(block), x) == x.numel() * x.element_size()
    assert saved_bytes(block, x) > 4 * x.numel() * x.element_size()  # without: several times more


def block_bytes_per_token(config, letter: str, context=lambda tokens: {}) -> float:
    """A block's saved bytes per token under bf16 autocast: the slope between two lengths (what does not grow
    with the tokens, autocast's weight copies, drops out). context(tokens): the block's keyword arguments
    (cu_seqlens and sp under sequence parallelism)."""
    from model.lm import Block
    from model.registry import by_letter

    torch.manual_seed(0)
    block = Block(config, by_letter()[letter].name)
    sizes = []
    for tokens in (64, 128):
        x = torch.randn(1, tokens, config.d_model, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sizes.append(saved_bytes(block, x, **context(tokens)))
    return (sizes[1] - sizes[0]) / 64


RECURRENT_LETTERS = ["G", "M", "D", "X", "R"]


def budget_config():
    """The 370M presets' width ratios scaled to d_model 128 (RG-LRU: hawk_370m's width 1408 and 8 heads; one
    d_ff for all)."""
    return small_config("A", d_model=128, d_ff=352, attention=AttentionConfig(num_heads=2),
                        gla=GLAConfig(num_heads=1), mamba2=Mamba2Config(expand=2, head_dim=64, d_state=16),
                        gated_deltanet=GatedDeltaNetConfig(num_heads=1, head_dim=96, expand_v=2.0),
                        mlstm=MLSTMConfig(num_heads=1), rglru=RGLRUConfig(num_heads=8, width=176))


@pytest.mark.parametrize("letter", RECURRENT_LETTERS)
def test_a_recurrent_block_keeps_at_most_1_3x_an_attention_block(letter):
    """The memory budget at the 370M presets' width ratios, scaled to d_model 128 (the 370M figures are
    bench/activation_memory.py's): the mixers keep their projections and the scan's output, not the convs',
    norms' and gates' intermediates (model/recurrent.py mix). Under sequence parallelism:
    tests/parallel/test_sequence_memory.py."""
    config = budget_config()
    ratio = block_bytes_per_token(config, letter) / block_bytes_per_token(config, "A")
    assert ratio <= 1.3, f"{letter} block keeps {ratio:.2f}x an attention block"
