"""rms_norm (kernels/norm) against the PyTorch formula in fp32, plain and with its SiLU gate before or after the
norm, on both paths: the Triton kernel in Triton's interpreter (one row per program, a row width that is no power
of two, several programs) and the PyTorch path; y in fp32 and bf16, rstd [..., 1]."""
import pytest
import torch

from kernels import rms_norm
from kernels.norm import naive_rms_norm


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", request.param)
    return request.param


def norm_inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * 3
    gate = torch.randn(*shape, generator=generator) * 2
    weight = 1 + torch.randn(shape[-1], generator=generator) / 2
    return x, gate, weight


@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 37), (2, 130), (7, 64)])
@pytest.mark.parametrize("gate_mode", [None, "before", "after"])  # the norm before or after the gate
def test_matches_the_formula_in_fp32(backend, shape, gate_mode):
    x, gate, weight = norm_inputs(shape, seed=shape[-1])
    gate = None if gate_mode is None else gate
    norm_before_gate = gate_mode != "after"
    y, rstd = rms_norm(x, weight, 1e-5, torch.float32, gate, norm_before_gate)
    expected_y, expected_rstd = naive_rms_norm(x, weight, 1e-5, gate, norm_before_gate)
    assert y.dtype == rstd.dtype == torch.float32 and rstd.shape == (*shape[:-1], 1)
    torch.testing.assert_close(y, expected_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd, expected_rstd, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("nan_buffers")
def test_bf16_input_and_output(backend):
    x, gate, weight = norm_inputs((4, 3, 48), seed=1)
    y, _ = rms_norm(x.bfloat16(), weight, 1e-5, torch.bfloat16, gate.bfloat16(), norm_before_gate=True)
    expected, _ = naive_rms_norm(x.bfloat16(), weight, 1e-5, gate.bfloat16(), norm_before_gate=True)
    assert y.dtype == torch.bfloat16
    # fp32 inside, one rounding out: the same bf16 on the PyTorch path, within one bf16 step on the Triton one
    # (Triton's interpreter does not round bf16 to nearest)
    step = 0 if backend == "torch" else 2 ** -7
    torch.testing.assert_close(y, expected.bfloat16(), rtol=step, atol=step)


def test_the_gate_changes_the_result_on_its_side_of_the_norm():
    x, gate, weight = norm_inputs((2, 16))
    after, _ = rms_norm(x, weight, 1e-5, torch.float32, gate, norm_before_gate=True)
    before, _ = rms_norm(x, weight, 1e-5, torch.float32, gate, norm_before_gate=False)
    plain, _ = rms_norm(x, weight, 1e-5, torch.float32)
    torch.testing.assert_close(after, plain * torch.nn.functional.silu(gate))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(2, 0), torch.zeros(0)), "D >= 1"),
    ((torch.zeros(2, 4), torch.zeros(3)), "weight must be"),
    ((torch.zeros(2, 4), torch.zeros(4), torch.zeros(2, 3)), "gate must have"),
])
def test_bad_input_is_named(args, message):
    x, weight, *gate = args
    with pytest.raises(ValueError, match=message):
        rms_norm(x, weight, 1e-5, torch.float32, *gate)
    with pytest.raises(ValueError, match="floating-point"):
        rms_norm(torch.zeros(2, 4), torch.zeros(4), 1e-5, torch.int32)
