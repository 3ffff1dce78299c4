"""What autograd keeps for the backward: the bytes of the tensors a forward saves, in total or by module.

A saved_tensors_hooks records the storage of every tensor autograd saves; the sum over distinct storages
(a view saved twice counts once; a view keeps its whole storage alive, so the whole storage counts),
parameters left out (they exist anyway and do not grow with the tokens), still alive when the forward
returns, is what the backward holds on to between forward and backward. A block under activation
checkpointing saves nothing through autograd but keeps its tensor inputs to recompute from: those count
too. Used by the activation-memory benchmark (bench/activation_memory.py) and the tests that bound it.
"""
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.multiprocessing.reductions import StorageWeakRef


class _SavedStorages:
    """The storages saved during a forward, each charged to an owner; a storage freed before the forward
    ends (a branch of the graph dropped on the way) counts for nothing, and its address may be reused."""

    def __init__(self, module: nn.Module):
        self.parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.saved: dict[int, tuple[StorageWeakRef, int, str]] = {}

    def keep(self, tensor: torch.Tensor, owner: str = "") -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in self.parameters or (address in self.saved and not self.saved[address][0].expired()):
            return
        self.saved[address] = (StorageWeakRef(storage), storage.nbytes(), owner)

    def by_owner(self) -> dict[str, int]:
        """Bytes per owner of the storages still alive (call it while the forward's output is)."""
        totals: dict[str, int] = defaultdict(int)
        for ref, nbytes, owner in self.saved.values():
            if not ref.expired():
                totals[owner] += nbytes
        return dict(totals)


@contextmanager
def _recording(module: nn.Module, owner=lambda: ""):
    record = _SavedStorages(module)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        record.keep(tensor, owner())
        return tensor

    def keep_inputs(_, args, kwargs) -> None:  # what a checkpointed module recomputes from
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                record.keep(value, owner())

    hooks = [sub.register_forward_pre_hook(keep_inputs, with_kwargs=True) for sub in module.modules()
             if isinstance(sub, CheckpointWrapper)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield record
    finally:
        for hook in hooks:
            hook.remove()


def saved_bytes(module: nn.Module, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves in one call module(*args, **kwargs), parameters excluded."""
    with _recording(module) as record:
        out = module(*args, **kwargs)  # noqa: F841 (holds the graph, and with it what it saved, until counted)
    return sum(record.by_owner().values())


def saved_bytes_by_module(module: nn.Module, *args, **kwargs) -> dict[str, int]:
    """saved_bytes split by the innermost submodule (its qualified name; '' for module itself) whose forward
    was running when a storage was first saved: which component keeps what."""
    names = {sub: name for name, sub in module.named_modules()}
    running: list[str] = []

    def enter(sub: nn.Module, _) -> None:
        running.append(names[sub])

    def leave(sub: nn.Module, _, __) -> None:  # returns None: the output stays the module's
        running.pop()

    hooks = [sub.register_forward_pre_hook(enter) for sub in names]
    hooks += [sub.register_forward_hook(leave) for sub in names]
    try:
        with _recording(module, owner=lambda: running[-1]) as record:
            out = module(*args, **kwargs)  # noqa: F841
        return record.by_owner()
    finally:
        for hook in hooks:
            hook.remove()


def packed_documents(seq_len: int, documents: int) -> torch.Tensor | None:
    """cu_seqlens of one row cut into `documents` equal documents (None for one)."""
    if documents <= 1:
        return None
    return torch.linspace(0, seq_len, documents + 1).round().to(torch.int32)
