"""What autograd keeps for the backward: the bytes of the tensors a forward saves, in total or by module.

A saved_tensors_hooks records the storage of every tensor autograd saves; the sum over distinct storages
(a view saved twice counts once), parameters left out (they exist anyway and do not grow with the tokens),
is what the backward holds on to between forward and backward. Used by the activation-memory benchmark
(bench/activation_memory.py) and the tests that bound it.
"""
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def _recording(module: nn.Module, on_save):
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            on_save(storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def saved_bytes(module: nn.Module, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves in one call module(*args, **kwargs), parameters excluded."""
    storages = {}
    with _recording(module, lambda storage: storages.setdefault(storage.data_ptr(), storage.nbytes())):
        module(*args, **kwargs)
    return sum(storages.values())


def saved_bytes_by_module(module: nn.Module, *args, **kwargs) -> dict[str, int]:
    """saved_bytes split by the innermost submodule (its qualified name; '' for module itself) whose forward
    was running when a storage was first saved: which component keeps what."""
    names = {sub: name for name, sub in module.named_modules()}
    running: list[str] = []
    owner: dict[int, tuple[str, int]] = {}

    def enter(sub: nn.Module, _) -> None:
        running.append(names[sub])

    def leave(sub: nn.Module, _, __) -> None:  # returns None: the output stays the module's
        running.pop()

    hooks = [sub.register_forward_pre_hook(enter) for sub in names]
    hooks += [sub.register_forward_hook(leave) for sub in names]
    try:
        with _recording(module, lambda storage: owner.setdefault(storage.data_ptr(),
                                                                 (running[-1], storage.nbytes()))):
            module(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    by_module: dict[str, int] = defaultdict(int)
    for name, nbytes in owner.values():
        by_module[name] += nbytes
    return dict(by_module)


def packed_documents(seq_len: int, documents: int) -> torch.Tensor | None:
    """cu_seqlens of one row cut into `documents` equal documents (None for one)."""
    if documents <= 1:
        return None
    return torch.linspace(0, seq_len, documents + 1).round().to(torch.int32)
