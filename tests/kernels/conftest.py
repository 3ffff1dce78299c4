"""Shared setup of the kernel tests (Triton's interpreter without a GPU: tests/conftest.py)."""
import pytest
import torch


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
