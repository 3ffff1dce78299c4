"""The suite's faster interpreter scan (tests/interpreter_scan.py) gives the interpreter's own results bit for
bit: the diagonal scans' affine-map composition over tiles with a ragged number of rows, forward and reversed,
through a tuple of two and of three carried values."""
import pytest
import torch
import triton
import triton.language as tl

from tests.interpreter_scan import scan_along_axis

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors only")


@triton.jit
def _compose(a1, b1, a2, b2):
    return a2 * a1, a2 * b1 + b2


@triton.jit
def _compose_three(a1, b1, c1, a2, b2, c2):
    return a2 * a1, a2 * b1 + b2, c1 + c2 * a1


@triton.jit
def scan_kernel(a, b, c, out_a, out_b, out_c, ROWS: tl.constexpr, COLS: tl.constexpr, REVERSE: tl.constexpr,
                THREE: tl.constexpr):
    offsets = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    b_a, b_b, b_c = tl.load(a + offsets), tl.load(b + offsets), tl.load(c + offsets)
    if THREE:
        s_a, s_b, s_c = tl.associative_scan((b_a, b_b, b_c), 0, _compose_three, reverse=REVERSE)
        tl.store(out_c + offsets, s_c)
    else:
        s_a, s_b = tl.associative_scan((b_a, b_b), 0, _compose, reverse=REVERSE)
    tl.store(out_a + offsets, s_a)
    tl.store(out_b + offsets, s_b)


def run_scan(rows, cols, reverse, three, seed):
    generator = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(rows, cols, generator=generator) for _ in range(3))
    outputs = [torch.full_like(a, float("nan")) for _ in range(3)]
    scan_kernel[(1,)](a, b, c, *outputs, ROWS=rows, COLS=cols, REVERSE=reverse, THREE=three)
    return outputs if three else outputs[:2]


@pytest.mark.parametrize("three", [False, True], ids=["pair", "triple"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_the_scan_along_the_axis_equals_the_interpreters(monkeypatch, reverse, three):
    from triton.runtime.interpreter import ScanOps

    assert ScanOps.generic_scan is scan_along_axis  # installed by tests/conftest.py
    fast = run_scan(16, 8, reverse, three, seed=1)
    monkeypatch.setattr(ScanOps, "generic_scan", ScanOps.element_by_element)
    slow = run_scan(16, 8, reverse, three, seed=1)
    for fast_out, slow_out in zip(fast, slow):
        assert not fast_out.isnan().any() and torch.equal(fast_out, slow_out)
