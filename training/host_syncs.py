"""Counting host syncs: the places where the host reads a tensor's values.

On a GPU each one stops the host until the device has caught up, so a training step that has them in its
layers can never run ahead of the GPU. `HostSyncs` records them in a region of code on any device (the tests
run it on CPU): the aten ops that read values on the host (`.item()`, `bool()`, `nonzero`, a
`repeat_interleave` with tensor counts...), and `Tensor.tolist()` / `.numpy()`, which read CPU data without
an aten op.
"""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
            "aten.masked_select", "aten.repeat_interleave.Tensor", "aten._unique", "aten.unique")
HOST_READS = ("tolist", "numpy")


class HostSyncs(TorchDispatchMode):
    """Within `with HostSyncs() as syncs:`, `syncs.counts` counts each kind of host read."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self._originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(SYNC_OPS):
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            self.counts[f"Tensor.{name}"] += 1
            return original(tensor, *args, **kwargs)
        return read

    @property
    def total(self) -> int:
        return sum(self.counts.values())
