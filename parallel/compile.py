"""Regional torch.compile (`train.compile=true`): every block compiled on its own, as torchtitan does.

A block is small enough to compile in seconds and the blocks of one mixer type share their code, where one
whole-model graph would take minutes and recompile for every change of shape. The recurrent kernels and the
short convolution are torch.library custom ops (kernels/common/custom_ops.py, kernels/conv/function.py), so
the compiler leaves the Triton launches alone and fuses what is around them: norms, gates, rotary, the MLP.
`nn.Module.compile` compiles in place, so parameter names (and checkpoints) stay those of eager mode.
Applied after activation checkpointing and before sharding, in every engine.
"""
from model import LM


def apply_compile(model: LM) -> None:
    for block in model.blocks:
        block.compile()
