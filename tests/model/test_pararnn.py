"""ParaRNN (model/pararnn.py): the Newton solution over the whole sequence equals the cell stepped token by token,
outputs and every gradient (the implicit-function backward), for odd lengths, initial states and packed
documents, for every cell: the GRU, the peephole LSTM (diagonal Jacobian) and the paper's LSTM through (h, c) and
its CIFG variant (2x2 Jacobian blocks: the block-diagonal scan). The iterations are counted on the device,
reported, capped and planned from their history; damping keeps the iterates from overshooting."""
import pytest
import torch

from model.config import ParaRNNConfig
from model.pararnn import CELLS, NewtonSolver, ParaRNN, newton_iterations, sequential_states

TOL = dict(atol=1e-5, rtol=1e-5)
H, D = 2, 8


def assert_same_solution_and_gradients(cell, p, u, initial_state, cu_seqlens=None, damping=1.0):
    """The solver and the loop: states, and the gradients of p, u and the initial state, for a random cotangent."""
    solved, iterations = NewtonSolver(cell, tol=1e-6, max_iters=50, initial_state=initial_state,
                                      cu_seqlens=cu_seqlens, damping=damping).solve(p, u)
    expected = sequential_states(cell, p, u, initial_state, cu_seqlens)
    torch.testing.assert_close(solved, expected, **TOL)
    cotangent = torch.randn_like(expected)
    inputs = (p, u, initial_state)
    grads = torch.autograd.grad((solved * cotangent).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), inputs)
    for name, grad, expected_grad in zip(("p", "u", "initial_state"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOL, msg=lambda m: f"d{name}: {m}")
    return int(iterations)


def random_inputs(cell, B, T, N, bound=0.5):
    p = torch.randn(B, T, cell.num_gates, H, D, requires_grad=True)
    u = (2 * bound * (torch.rand(cell.num_gates, H, D) - 0.5)).requires_grad_()
    return p, u, cell.zeros(N, H, D, like=p).normal_().requires_grad_()


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


@pytest.mark.parametrize("damping", [None, 0.5], ids=["plain", "damped"])
def test_undamped_and_strongly_damped_newton_reach_the_same_solution(damping):
    """The damping changes the path, not the fixed point nor the implicit gradient (the paper's LSTM, strong
    recurrent weights)."""
    torch.manual_seed(2)
    cell = CELLS["lstm_hc"]
    assert_same_solution_and_gradients(cell, *random_inputs(cell, 2, 70, 2, bound=1.5), damping=damping)


def test_lstm_through_h_and_c_is_the_textbook_cell():
    """The "hc" cell's step is the LSTM (Hochreiter & Schmidhuber; Gers et al.) with diagonal recurrent weights on
    h, and its Jacobian is autograd's, 2x2 per channel; "cifg" is the same with i = 1 - f."""
    torch.manual_seed(3)
    p, u = torch.randn(5, 4, H, D, dtype=torch.float64), torch.randn(4, H, D, dtype=torch.float64)
    state = torch.randn(5, H, D, 2, dtype=torch.float64)
    h, c = state.unbind(-1)
    f, i, o = (torch.sigmoid(p[:, k] + u[k] * h) for k in (0, 1, 3))
    c_t = f * c + i * torch.tanh(p[:, 2] + u[2] * h)
    value, jacobian = CELLS["lstm_hc"].step(state, p, u)
    torch.testing.assert_close(value, torch.stack([o * torch.tanh(c_t), c_t], -1))
    for cell, gates in ((CELLS["lstm_hc"], p), (CELLS["lstm_cifg"], p[:, [0, 2, 3]])):
        weights = u if cell.num_gates == 4 else u[[0, 2, 3]]
        full = torch.autograd.functional.jacobian(lambda s: cell.step(s, gates, weights)[0], state)  # [5,H,D,2]^2
        per_channel = full.diagonal(0, 0, 4).diagonal(0, 0, 3).diagonal(0, 0, 2).permute(2, 3, 4, 0, 1)
        torch.testing.assert_close(cell.step(state, gates, weights)[1], per_channel)
    cifg = CELLS["lstm_cifg"].step(state, p[:, [0, 2, 3]], u[[0, 2, 3]])[0]
    c_cifg = f * c + (1 - f) * torch.tanh(p[:, 2] + u[2] * h)
    torch.testing.assert_close(cifg, torch.stack([o * torch.tanh(c_cifg), c_cifg], -1))


def reference_mixer(mixer: ParaRNN, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The mixer written out with the sequential loop: projections, the cell token by token, readout, output."""
    G = mixer.cell.num_gates
    p = (x @ mixer.in_proj.weight.T).view(1, x.shape[1], G, mixer.num_heads, mixer.head_dim)
    p = p + mixer.gate_bias.view(G, mixer.num_heads, mixer.head_dim)
    u = mixer.recurrent_weight.view(G, mixer.num_heads, mixer.head_dim)
    states = sequential_states(mixer.cell, p, u, cu_seqlens=cu_seqlens)
    return mixer.cell.readout(states, p, u).flatten(-2) @ mixer.o_proj.weight.T


CELL_SETTINGS = {"U": ("U", "peephole"), "L": ("L", "peephole"), "L-hc": ("L", "hc"), "L-cifg": ("L", "cifg")}


@pytest.mark.parametrize("case", CELL_SETTINGS)
def test_mixer_outputs_and_every_gradient_equal_the_loop(make_lm, case):
    pattern, lstm = CELL_SETTINGS[case]
    settings = ParaRNNConfig(num_heads=2, width=32, newton_tol=1e-6, newton_max_iters=50, lstm=lstm)
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
        torch.testing.assert_close(grad, expected_grad, **TOL, msg=lambda m: f"{case} d{name}: {m}")


@pytest.mark.parametrize("case", ["U", "L", "L-hc"])
def test_iterations_are_reported_capped_and_planned(make_lm, case):
    """The metrics read the iterations each layer needed (one host read), then every layer's plan follows them:
    the same solution with fewer scans; a plan too short for a forward is reported and sent back to the cap."""
    pattern, lstm = CELL_SETTINGS[case]
    settings = ParaRNNConfig(num_heads=2, width=32, lstm=lstm)
    ids = torch.randint(0, 97, (2, 40))
    lm = make_lm(pattern + pattern, pararnn=settings)
    cap = settings.newton_max_iters
    with torch.no_grad():
        converged = lm(ids)
    used = [block.mixer.last_newton_iterations for block in lm.blocks]
    assert all(2 <= n < cap for n in used)
    metrics = newton_iterations(lm)
    assert metrics == {"newton_iters_max": max(used), "newton_iters_mean": sum(used) / 2,
                       "newton_scans_max": cap, "newton_unconverged": 0}
    assert newton_iterations(make_lm("A")) == {}
    assert [block.mixer.newton_plan for block in lm.blocks] == [n - 1 + 1 for n in used]  # needed + PLAN_MARGIN
    with torch.no_grad():
        planned = lm(ids)
    torch.testing.assert_close(planned, converged, rtol=0, atol=0)  # predicated: the very same iterates
    assert newton_iterations(lm)["newton_scans_max"] == max(used) + 1

    for block in lm.blocks:  # a plan one iteration short of what this batch needs
        block.mixer.newton_plan = block.mixer.last_newton_iterations - 2
    with torch.no_grad():
        lm(ids)
    assert newton_iterations(lm)["newton_unconverged"] == 2
    assert all(block.mixer.newton_plan == cap - 1 for block in lm.blocks)

    capped = make_lm(pattern + pattern, pararnn=ParaRNNConfig(num_heads=2, width=32, newton_max_iters=1, lstm=lstm))
    with torch.no_grad():
        first_scan = capped(ids)  # the same weights (same seed), one linearisation about h = 0
    assert newton_iterations(capped)["newton_iters_max"] == 1
    assert not torch.allclose(first_scan, converged, atol=1e-4)


def test_damping_keeps_the_iterates_from_overshooting(monkeypatch):
    """The case that overshot: the peephole LSTM with recurrent weights in [-1, 1], from h = 0, moved its states by
    4e6 in an iteration where the solution stays below 500. Damped, no iteration moves any state by more than
    the solution's largest magnitude, and both reach the loop's solution."""
    changes = []
    max_change = NewtonSolver._max_change
    monkeypatch.setattr(NewtonSolver, "_max_change",
                        lambda self, new, old: changes.append((new - old).abs().amax()) or max_change(self, new, old))
    torch.manual_seed(3)
    cell = CELLS["lstm"]
    p, u = torch.randn(2, 512, 4, 2, 8), 2 * torch.rand(4, 2, 8) - 1
    solution = sequential_states(cell, p, u)
    largest = solution.abs().amax().item()
    assert 100 < largest < 1000
    for damping, bounded in ((None, False), (1.0, True)):
        changes.clear()
        solver = NewtonSolver(cell, tol=1e-6, max_iters=80, damping=damping)
        states, _ = solver.solve(p, u)
        assert bool(solver.converged)
        torch.testing.assert_close(states, solution, rtol=1e-5, atol=2e-4)
        overshoot = max(changes).item() / largest
        assert overshoot <= 1.05 if bounded else overshoot > 1e3, (damping, overshoot)


@pytest.mark.parametrize("lstm", ["hc", "cifg"])
def test_lstm_through_h_and_c_decodes_like_teacher_forcing(make_lm, lstm):
    """Its state (h, c) [B, H, D, 2] in the cache: token by token, and a prefill across two chunks then decode
    steps, give the teacher-forced logits."""
    lm = make_lm("UL", pararnn=ParaRNNConfig(num_heads=2, width=32, lstm=lstm))
    ids = torch.randint(0, 97, (2, 72))
    with torch.no_grad():
        expected = lm(ids)
        state = lm.init_state(2, max_len=80)
        assert state.caches[1]["recurrent"].shape == (2, 2, 16, 2)
        stepped = torch.stack([lm.step(ids[:, t], state) for t in range(12)], 1)
        state = lm.init_state(2, max_len=80)
        prefill = lm.step(ids[:, :67], state)
        decoded = torch.stack([lm.step(ids[:, t], state) for t in range(67, 72)], 1)
    torch.testing.assert_close(stepped, expected[:, :12], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prefill, expected[:, :67], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(decoded, expected[:, 67:], atol=1e-5, rtol=1e-4)


# ---- one graph: torch.export on the GPU's path (traced, not run), a CUDA graph on a GPU ---------------------

@pytest.mark.parametrize("lstm", ["peephole", "hc"])
def test_a_layer_traces_as_one_graph_without_host_reads(make_lm, monkeypatch, lstm):
    """Strict torch.export (dynamo, fullgraph) of a GRU/LSTM layer's forward on the Triton path (the scans as
    opaque custom ops, traced with fake tensors): every Newton iteration in one graph, no host read in it
    (a data-dependent branch or .item() would break the trace or leave a scalar read), and the iteration counts
    written to the layer's buffer in place: what capturing it in a CUDA graph needs."""
    from training.host_syncs import SYNC_OPS
    monkeypatch.setenv("BATON_KERNELS", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    mixer = make_lm("UL", pararnn=ParaRNNConfig(num_heads=2, width=32, lstm=lstm)).blocks[1].mixer
    exported = torch.export.export(mixer, (torch.randn(2, 50, 64),), strict=True)
    graphs = [module for module in exported.graph_module.modules() if isinstance(module, torch.fx.GraphModule)]
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    scan = "baton.block_diagonal_scan" if lstm == "hc" else "baton.diagonal_scan"
    assert sum(t.startswith(scan) for t in targets) == mixer.newton_plan + 1 == 16
    assert not [t for t in targets if t.startswith(SYNC_OPS)]
    assert "aten.copy_.default" in targets  # newton_stats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("lstm", ["peephole", "hc"])
def test_a_layer_captures_in_a_cuda_graph(make_lm, lstm):
    """Forward and backward of a layer captured once (torch.cuda.make_graphed_callables) and replayed on new
    inputs give eager mode's outputs and gradients."""
    mixer = make_lm("L", pararnn=ParaRNNConfig(num_heads=2, width=32, lstm=lstm)).blocks[0].mixer.cuda().train()
    sample = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(mixer, (sample,))
    x = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    cotangent = torch.randn(2, 100, 64, device="cuda")
    results = []
    for layer in (graphed, mixer):
        out = layer(x)
        grads = torch.autograd.grad(out, [x, *mixer.parameters()], cotangent)
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for graphed_grad, eager_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(graphed_grad, eager_grad, rtol=1e-4, atol=1e-4)
