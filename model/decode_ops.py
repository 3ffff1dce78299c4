"""Counting the aten operations of one decode step, per block: the constant-work property of generation (the
same operations at every context, no host sync) that tests/model/test_decode_ops.py checks and bench/decode.py
reports."""
import importlib
from collections import Counter
from contextlib import ExitStack
from unittest import mock

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from model.lm import LM

# The kernel entry points the blocks' decode steps call (module, name): the norms (plain and gated), the short
# conv, attention's rotary embedding, and each recurrent mixer's step of its cached state (recurrent_step: the
# fused recurrent kernel). Their internal operations are counted apart, since on CUDA each is one Triton launch.
KERNEL_ENTRY_POINTS = (("model.layers", "rms_norm"), ("model.recurrent", "causal_conv1d"),
                       ("model.attention", "rotate_rows"), ("model.gla", "recurrent_step"),
                       ("model.mamba2", "recurrent_step"), ("model.gated_deltanet", "recurrent_step"),
                       ("model.rglru", "recurrent_step"), ("model.mlstm", "recurrent_step"))

HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class OpCounter(TorchDispatchMode):
    """Counts every aten operation under a label: ("block", i), ("kernel", i) inside block i's kernel calls,
    None (embedding, head, the step's own) or ("kernel", None) inside the kernel calls outside the blocks (the
    final norm)."""

    def __init__(self):
        super().__init__()
        self.label, self.counts, self.kernel_calls = None, Counter(), Counter()
        self.host_syncs, self.output_elements = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.label] += 1
        if func in HOST_SYNCS:
            self.host_syncs[self.label] += 1
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # what the op wrote (a new tensor, or in place)
            self.output_elements[self.label] += sum(t.numel() for t in pytree.tree_leaves(out)
                                                    if isinstance(t, torch.Tensor))
        return out

    def labelled(self, label_of, fn):
        def run(*args, **kwargs):
            outer = self.label
            self.label = label_of(outer)
            try:
                return fn(*args, **kwargs)
            finally:
                self.label = outer
        return run


def count_decode_ops(lm: LM, token_ids: torch.Tensor, state) -> dict:
    """The aten operations of one decode step (the step is taken: the state advances): in all, and per block
    {mixer, ops, kernel_ops (inside the kernel entry points), kernel_calls, own_ops (ops - kernel_ops +
    kernel_calls: each kernel call counted once), host_syncs and kernel_host_syncs (.item() and the like),
    output_elements (elements the block's ops wrote, views excluded)}, and outside_blocks (embedding, final
    norm, head: each kernel call counted once)."""
    counter = OpCounter()
    with ExitStack() as stack, torch.no_grad():
        for module_name, name in KERNEL_ENTRY_POINTS:
            module = importlib.import_module(module_name)
            kernel = counter.labelled(lambda outer: ("kernel", outer and outer[1]), getattr(module, name))

            def counted(*args, _kernel=kernel, **kwargs):
                counter.kernel_calls[counter.label and counter.label[1]] += 1
                return _kernel(*args, **kwargs)
            stack.enter_context(mock.patch.object(module, name, counted))
        for i, block in enumerate(lm.blocks):
            stack.enter_context(mock.patch.object(block, "forward",
                                                  counter.labelled(lambda outer, i=i: ("block", i), block.forward)))
        with counter:
            lm.decode_step(token_ids, state)
    blocks = []
    for i, name in enumerate(lm.config.layer_mixers()):
        kernel_ops = counter.counts[("kernel", i)]
        ops = counter.counts[("block", i)] + kernel_ops
        blocks.append({"mixer": name, "ops": ops, "kernel_ops": kernel_ops, "kernel_calls": counter.kernel_calls[i],
                       "own_ops": ops - kernel_ops + counter.kernel_calls[i],
                       "host_syncs": counter.host_syncs[("block", i)],
                       "kernel_host_syncs": counter.host_syncs[("kernel", i)],
                       "output_elements": counter.output_elements[("block", i)]
                       + counter.output_elements[("kernel", i)]})
    return {"total": sum(counter.counts.values()), "blocks": blocks,
            "outside_blocks": counter.counts[None] + counter.kernel_calls[None]}
