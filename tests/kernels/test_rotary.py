"""rotate_rows (kernels/rotary), a decode step's rotary embedding of one token per row, against the PyTorch
formula in fp32 on both paths (the Triton kernel in Triton's interpreter: head counts not a multiple of the
heads per program, several rows at far apart positions), and against the training path's apply_rotary."""
import pytest
import torch

from kernels import rotate_rows
from kernels.rotary import naive_rotate_rows
from model.layers import apply_rotary, rope_frequencies

THETA = 10000.0


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", request.param)
    return request.param


def inv_freq(D: int) -> torch.Tensor:
    """What an attention layer's decode cache holds: the frequencies repeated for both halves."""
    half = D // 2
    freq = THETA ** (-torch.arange(half, dtype=torch.float32) / half)
    return torch.cat((freq, freq))


@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("B,H,D", [(1, 1, 2), (3, 5, 16), (2, 7, 24), (4, 2, 64)])
def test_matches_the_formula_in_fp32(backend, B, H, D):
    generator = torch.Generator().manual_seed(B * H * D)
    x = torch.randn(B, H, D, generator=generator)
    positions = torch.tensor([0, 1, 131071, 37][:B])  # angles up to 131071 radians
    y = rotate_rows(x, positions, inv_freq(D))
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, naive_rotate_rows(x, positions, inv_freq(D)), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("nan_buffers")
def test_equals_training_rotary_row_by_row(backend):
    x = torch.randn(3, 6, 32)
    positions = torch.tensor([5, 0, 300])
    y = rotate_rows(x, positions, inv_freq(32))
    for b in range(3):
        expected = apply_rotary(x[b][None, None], positions[b:b + 1], rope_frequencies(32, THETA))[0, 0]
        torch.testing.assert_close(y[b], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], x[1])  # position 0 is no rotation


@pytest.mark.usefixtures("nan_buffers")
def test_bf16_keeps_its_dtype(backend):
    x = torch.randn(2, 4, 16).bfloat16()
    positions = torch.tensor([3, 9])
    y = rotate_rows(x, positions, inv_freq(16))
    assert y.dtype == torch.bfloat16
    # one rounding of the fp32 result: within one bf16 step on the Triton path (Triton's interpreter does not
    # round bf16 to nearest)
    step = 0 if backend == "torch" else 2 ** -7
    torch.testing.assert_close(y, naive_rotate_rows(x, positions, inv_freq(16)), rtol=step, atol=step)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="even D"):
        rotate_rows(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long), torch.zeros(5))
    with pytest.raises(ValueError, match="positions must be"):
        rotate_rows(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="inv_freq must be"):
        rotate_rows(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.float64))
