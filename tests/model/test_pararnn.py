"""ParaRNN (model/pararnn.py): the Newton solution over the whole sequence equals the cell stepped token by token,
outputs and every gradient (the implicit-function backward), for odd lengths, initial states and packed
documents; the iterations are reported and capped."""
import pytest
import torch

from model.config import ParaRNNConfig
from model.pararnn import CELLS, NewtonSolver, ParaRNN, newton_iterations, sequential_states

TOL = dict(atol=1e-5, rtol=1e-5)
H, D = 2, 8


def assert_same_solution_and_gradients(cell, p, u, initial_state, cu_seqlens=None):
    """The solver and the loop: states, and the gradients of p, u and the initial state, for a random cotangent."""
    solved, iterations = NewtonSolver(cell, tol=1e-6, max_iters=50, initial_state=initial_state,
                                      cu_seqlens=cu_seqlens).solve(p, u)
    expected = sequential_states(cell, p, u, initial_state, cu_seqlens)
    torch.testing.assert_close(solved, expected, **TOL)
    cotangent = torch.randn_like(expected)
    inputs = (p, u, initial_state)
    grads = torch.autograd.grad((solved * cotangent).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), inputs)
    for name, grad, expected_grad in zip(("p", "u", "initial_state"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOL, msg=lambda m: f"d{name}: {m}")
    return iterations


def random_inputs(cell, B, T, N):
    p = torch.randn(B, T, cell.num_gates, H, D, requires_grad=True)
    u = (torch.rand(cell.num_gates, H, D) - 0.5).requires_grad_()
    return p, u, torch.randn(N, H, D, requires_grad=True)


@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS.keys())
@pytest.mark.parametrize("T", [1, 37, 130])  # one token, odd, across the scan's 64-token chunks
def test_newton_equals_the_sequential_loop(cell, T):
    torch.manual_seed(T)
    iterations = assert_same_solution_and_gradients(cell, *random_inputs(cell, 2, T, 2))
    assert 2 <= iterations < 50  # converged on the tolerance, not the cap (T = 1 is exact after one scan)


@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS.keys())
def test_packed_documents_restart_from_their_initial_states(cell):
    torch.manual_seed(1)
    cu_seqlens = torch.tensor([0, 5, 6, 70, 71, 99], dtype=torch.int32)  # odd lengths, one-token documents
    assert_same_solution_and_gradients(cell, *random_inputs(cell, 1, 99, 5), cu_seqlens=cu_seqlens)


def reference_mixer(mixer: ParaRNN, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The mixer written out with the sequential loop: projections, the cell token by token, readout, output."""
    G = mixer.cell.num_gates
    p = (x @ mixer.in_proj.weight.T).view(1, x.shape[1], G, mixer.num_heads, mixer.head_dim)
    p = p + mixer.gate_bias.view(G, mixer.num_heads, mixer.head_dim)
    u = mixer.recurrent_weight.view(G, mixer.num_heads, mixer.head_dim)
    states = sequential_states(mixer.cell, p, u, cu_seqlens=cu_seqlens)
    return mixer.cell.readout(states, p, u).flatten(-2) @ mixer.o_proj.weight.T


@pytest.mark.parametrize("pattern", ["U", "L"])
def test_mixer_outputs_and_every_gradient_equal_the_loop(make_lm, pattern):
    settings = ParaRNNConfig(num_heads=2, width=32, newton_tol=1e-6, newton_max_iters=50)
    mixer = make_lm(pattern, pararnn=settings).blocks[0].mixer
    with torch.no_grad():  # recurrent weights of order one, so the cell is far from linear
        mixer.recurrent_weight.uniform_(-1.0, 1.0)
    cu_seqlens = torch.tensor([0, 13, 14, 53], dtype=torch.int32)
    x = torch.randn(1, 53, 64, requires_grad=True)
    out = mixer(x, cu_seqlens=cu_seqlens)
    expected = reference_mixer(mixer, x, cu_seqlens)
    torch.testing.assert_close(out, expected, **TOL)
    cotangent = torch.randn_like(out)
    inputs = {"x": x, **dict(mixer.named_parameters())}
    grads = torch.autograd.grad((out * cotangent).sum(), list(inputs.values()))
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), list(inputs.values()))
    for name, grad, expected_grad in zip(inputs, grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOL, msg=lambda m: f"{pattern} d{name}: {m}")


@pytest.mark.parametrize("pattern", ["U", "L"])
def test_iterations_are_reported_and_capped(make_lm, pattern):
    ids = torch.randint(0, 97, (2, 40))
    lm = make_lm(pattern + pattern)
    with torch.no_grad():
        converged = lm(ids)
    used = [block.mixer.last_newton_iterations for block in lm.blocks]
    assert all(2 <= n < lm.config.pararnn.newton_max_iters for n in used)
    assert newton_iterations(lm) == {"newton_iters_max": max(used), "newton_iters_mean": sum(used) / 2}
    assert newton_iterations(make_lm("A")) == {}

    capped = make_lm(pattern + pattern, pararnn=ParaRNNConfig(num_heads=2, width=32, newton_max_iters=1))
    with torch.no_grad():
        first_scan = capped(ids)  # the same weights (same seed), one linearisation about h = 0
    assert newton_iterations(capped)["newton_iters_max"] == 1
    assert not torch.allclose(first_scan, converged, atol=1e-4)
