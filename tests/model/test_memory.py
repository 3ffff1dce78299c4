"""model/memory.py, the measure behind bench/activation_memory.py: the split by module adds up to the total,
a block measured alone keeps what it keeps inside the model (so a preset's figure is its blocks' plus the
rest), and a checkpointed block counts the input it recomputes from."""
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model.memory import saved_bytes, saved_bytes_by_module


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
    assert saved_bytes(block, x) > 10 * x.numel() * x.element_size()
