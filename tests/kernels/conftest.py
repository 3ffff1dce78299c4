"""Shared setup of the kernel tests.

Without a GPU the Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 has to be in the
environment before any kernel is decorated, i.e. before the first import of a Triton kernel module
(the kernels' packages import them lazily, so setting it here, at collection, is early enough).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_buffers(monkeypatch):
    """Fill every freshly allocated floating-point buffer with NaN, so an element a kernel forgets to
    write shows up as NaN in the result instead of passing by chance."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: fill(new_empty(self, *a, **kw)))
