"""Nonlinear RNNs trained in parallel (ParaRNN: Danieli et al. 2025, arXiv:2510.21450, "ParaRNN: Unlocking Parallel
Training of Nonlinear RNNs for Large Language Models"): GRU- and LSTM-style cells with diagonal recurrent weights, their
T nonlinear steps solved together by Newton's method on the diagonal scan (kernels/diagonal_scan).

The mixer: per token the gates' input terms p = W x + b for all tokens at once (one matmul), the recurrence
h_t = f(h_{t-1}, p_t) per channel (u: the diagonal recurrent weights, one vector per gate), out = W_o y.
    GRU (letter U, state h):   z = sigmoid(p_z + u_z h), r = sigmoid(p_r + u_r h), c = tanh(p_c + u_c (r h)),
                               h_t = (1 - z) h + z c;   y_t = h_t
    LSTM (letter L, state c):  f = sigmoid(p_f + u_f c), i = sigmoid(p_i + u_i c), g = tanh(p_g + u_g c),
                               c_t = f c + i g;   y_t = sigmoid(p_o + u_o c_t) tanh(c_t)
The LSTM's gates read the cell state c_{t-1} (peephole connections), not h_{t-1}: with one state per channel
the Jacobian stays diagonal and one diagonal scan solves each Newton step. (The paper's LSTM recurs through
both c and h, whose Jacobian is 2x2 per channel: a block-diagonal scan we do not have.)

Newton: from h^0 = 0, h^{k+1}_t = J_t h^{k+1}_{t-1} + (f(h^k_{t-1}, p_t) - J_t h^k_{t-1}) with the closed-form
diagonal Jacobian J_t = df/dh_{t-1} at h^k_{t-1}: one chunk_diagonal_scan(a=J, b=residual) per iteration, until
no state moved by more than newton_tol (or newton_max_iters scans). At a sequence start h_{t-1} is the initial
state (zero, or the cached one), which the scan's initial_state / cu_seqlens give.

Backward: implicit differentiation at the fixed point h*, not Newton unrolled. The iterations run without
autograd; one last Newton step runs with it, its Jacobian detached and h*_{t-1} detached: its value is h*
(to the tolerance), and its gradient is lambda^T df/d(p, u, h_0) with lambda the solution of the transposed
system lambda_t = dL/dh_t + J_{t+1} lambda_{t+1}, which is exactly the scan's own backward (the reverse-time
transposed scan, with cu_seqlens and across sequence-parallel ranks). So the backward is one reverse scan and
one backward through the cell at h*, whatever the number of iterations.

Sequence parallelism: each iteration is a diagonal scan across ranks (sp.scan with the diagonal scan core), the
previous rank's last state reaches a slice's first token through sp.halo, and the convergence test is
all-reduced over the sp group so every rank runs the same iterations. Each iteration's test reads one number
on the host (a sync per iteration: the price of stopping on a tolerance).
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from kernels.diagonal_scan import chunk_diagonal_scan
from model.config import ModelConfig
from model.registry import Mixer, register
# The diagonal scan in the recurrent cores' form (h_t = a_t h_{t-1} + k_t v_t per channel), as the RG-LRU
# registered it: sequence parallelism runs each Newton step through it with k = the residual, v = 1.
from model.rglru import RGLRU_CORE as DIAGONAL_SCAN_CORE

RECURRENT_WEIGHT_BOUND = 0.5  # u starts uniform in [-bound, bound]: Jacobians of order one, Newton converges fast


@dataclass(frozen=True)
class Cell:
    """A diagonal recurrent cell: step(h_prev, p, u) -> (h_t, dh_t/dh_prev) for states [..., H, D] and gate inputs
    p [..., G, H, D] (u [G, H, D]); readout(h_t, p, u) -> the mixer's output y_t [..., H, D]."""
    name: str
    num_gates: int
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    readout: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    forget_bias: float = 0.0  # the bias of gate 0 at init (the LSTM's forget gate starts open)


def gru_step(h: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p_z, p_r, p_c = p.unbind(-3)
    u_z, u_r, u_c = u.unbind(0)
    z = torch.sigmoid(p_z + u_z * h)
    r = torch.sigmoid(p_r + u_r * h)
    c = torch.tanh(p_c + u_c * (r * h))
    dz = z * (1 - z) * u_z
    dc = (1 - c * c) * u_c * (r + h * r * (1 - r) * u_r)
    return h + z * (c - h), 1 - z + dz * (c - h) + z * dc


def lstm_step(c: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p_f, p_i, p_g, _ = p.unbind(-3)
    u_f, u_i, u_g, _ = u.unbind(0)
    f = torch.sigmoid(p_f + u_f * c)
    i = torch.sigmoid(p_i + u_i * c)
    g = torch.tanh(p_g + u_g * c)
    return f * c + i * g, f + f * (1 - f) * u_f * c + i * (1 - i) * u_i * g + i * (1 - g * g) * u_g


def lstm_readout(c: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(p.select(-3, 3) + u[3] * c) * torch.tanh(c)


CELLS = {"gru": Cell("gru", 3, gru_step, readout=lambda h, p, u: h),
         "lstm": Cell("lstm", 4, lstm_step, readout=lstm_readout, forget_bias=1.0)}


def sequential_states(cell: Cell, p: torch.Tensor, u: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: the cell stepped token by token. p [B, T, G, H, D], u [G, H, D], initial_state [N, H, D]
    (N = B, or the sequences of cu_seqlens over B = 1) -> the states [B, T, H, D]."""
    B, T = p.shape[:2]
    starts = _sequence_starts(cu_seqlens, T, p.device) if cu_seqlens is not None else None
    first = initial_state if initial_state is not None else p.new_zeros(
        B if cu_seqlens is None else cu_seqlens.numel() - 1, *p.shape[-2:])
    h, states = (first if cu_seqlens is None else None), []
    for t, p_t in enumerate(p.unbind(1)):  # unbind: one backward for all steps (p[:, t]'s would each be p-sized)
        if starts is not None and bool(starts[0][t]):
            h = first[starts[1][t]][None]
        h = cell.step(h, p_t, u)[0]
        states.append(h)
    return torch.stack(states, 1)


def _sequence_starts(cu_seqlens: torch.Tensor, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([T] whether a token starts a sequence, [T] each token's sequence index) of cu_seqlens over T tokens."""
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    starts = torch.zeros(T + 1, dtype=torch.bool, device=device)
    starts[bounds[:-1]] = True  # an empty last sequence marks position T, dropped below
    sequence = torch.searchsorted(bounds[1:], torch.arange(T, device=device), right=True)
    return starts[:T], sequence


class NewtonSolver:
    """Solves h_t = f(h_{t-1}, p_t) over [B, T] for one layout: rows (B sequences from initial_state), packed
    documents (B = 1, cu_seqlens, initial_state [N, H, D]), or one sequence-parallel slice (sp)."""

    def __init__(self, cell: Cell, tol: float, max_iters: int, initial_state: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None, sp=None):
        self.cell, self.tol, self.max_iters = cell, tol, max_iters
        self.initial_state, self.cu_seqlens, self.sp = initial_state, cu_seqlens, sp

    def solve(self, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, int]:
        """p [B, T, G, H, D] fp32 -> (the states [B, T, H, D] fp32, the scans it took)."""
        h = p.new_zeros(*p.shape[:2], *p.shape[-2:])
        iterations = 0
        with torch.no_grad():
            for iterations in range(1, self.max_iters):
                h_next = self._newton_step(h, p, u, self._detached(self.initial_state))
                converged = self._max_change(h_next, h) < self.tol
                h = h_next
                if converged:
                    break
        # The differentiable step at the solution: its backward is the implicit-function gradient.
        return self._newton_step(h, p, u, self.initial_state, differentiable=True), iterations + 1

    def _newton_step(self, h: torch.Tensor, p: torch.Tensor, u: torch.Tensor, initial_state: Optional[torch.Tensor],
                     differentiable: bool = False) -> torch.Tensor:
        previous = self._previous(h, initial_state)
        value, jacobian = self.cell.step(previous, p, u)
        if differentiable:
            jacobian = jacobian.detach()
        residual = value - jacobian * previous
        if self.sp is not None:
            return self.sp.scan(DIAGONAL_SCAN_CORE, residual, residual, torch.ones_like(residual), a=jacobian)
        return chunk_diagonal_scan(jacobian, residual, initial_state, False, self.cu_seqlens)[0]

    def _previous(self, h: torch.Tensor, initial_state: Optional[torch.Tensor]) -> torch.Tensor:
        """h_{t-1} for every token: h shifted by one, the sequence's incoming state at each sequence start."""
        shifted = torch.cat([h.new_zeros(h.shape[0], 1, *h.shape[2:]), h[:, :-1].detach()], 1)
        if self.sp is not None:
            return self._previous_across_ranks(h, shifted)
        if self.cu_seqlens is None:
            if initial_state is None:
                return shifted
            return torch.cat([initial_state[:, None].to(h.dtype), shifted[:, 1:]], 1)
        if initial_state is None:
            initial_state = h.new_zeros(self.cu_seqlens.numel() - 1, *h.shape[2:])
        starts, sequence = _sequence_starts(self.cu_seqlens, h.shape[1], h.device)
        return torch.where(starts.view(1, -1, 1, 1), initial_state[sequence][None].to(h.dtype), shifted)

    def _previous_across_ranks(self, h: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
        """Under sp (h [1, B*T_local, H, D]): a row's first token continues from the previous rank's last state
        (sp.halo: zero where the row starts a document here); every other sequence start from zero."""
        sp = self.sp
        rows = h.detach().reshape(sp.batch_size, sp.seq_len, *h.shape[2:])
        incoming = sp.halo(rows, 1)[:, 0]  # [B, H, D]
        segment_starts = sp.cu_seqlens[:-1].long()
        row_start = segment_starts % sp.seq_len == 0
        row = (segment_starts // sp.seq_len).clamp(max=sp.batch_size - 1)
        per_segment = incoming[row] * row_start.view(-1, 1, 1).to(h.dtype)
        starts, sequence = _sequence_starts(sp.cu_seqlens, h.shape[1], h.device)
        return torch.where(starts.view(1, -1, 1, 1), per_segment[sequence][None], shifted)

    def _max_change(self, h_next: torch.Tensor, h: torch.Tensor) -> float:
        """The largest change of any state relative to the largest state (at least 1), over every rank of the sp
        group: all ranks stop together. Relative, because fp32 rounding alone moves a state of magnitude 100 by
        about 1e-5 per iteration: an absolute tolerance would never be met and every step would run to the cap."""
        change = ((h_next - h).abs().amax() / h_next.abs().amax().clamp_min(1.0)) if h.numel() else h.new_zeros(())
        if self.sp is not None:
            dist.all_reduce(change, op=dist.ReduceOp.MAX, group=self.sp.group)
        return change.item()

    @staticmethod
    def _detached(state: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if state is None else state.detach()


class ParaRNN(nn.Module):
    """A diagonal GRU or LSTM cell (see the module docstring) between an input and an output projection.
    `last_newton_iterations`: the scans its last forward took (newton_iterations(model) collects them)."""

    def __init__(self, cfg: ModelConfig, cell: Cell):
        super().__init__()
        c = cfg.pararnn
        self.cell = cell
        self.width = c.recurrent_width(cfg.d_model)
        self.num_heads = c.num_heads
        self.head_dim = self.width // c.num_heads
        self.newton_tol, self.newton_max_iters = c.newton_tol, c.newton_max_iters
        self.in_proj = nn.Linear(cfg.d_model, cell.num_gates * self.width, bias=False)
        self.recurrent_weight = nn.Parameter(torch.empty(cell.num_gates, self.width))  # u, one vector per gate
        self.gate_bias = nn.Parameter(torch.empty(cell.num_gates, self.width))
        self.o_proj = nn.Linear(self.width, cfg.d_model, bias=False)
        self.last_newton_iterations = 0
        self.reset_parameters()

    def reset_parameters(self):
        """u uniform in [-RECURRENT_WEIGHT_BOUND, RECURRENT_WEIGHT_BOUND], biases zero but the forget gate's. In place
        only (sharded parameters after a meta build)."""
        with torch.no_grad():
            self.recurrent_weight.uniform_(-RECURRENT_WEIGHT_BOUND, RECURRENT_WEIGHT_BOUND)
            self.gate_bias.zero_()
            self.gate_bias[0].fill_(self.cell.forget_bias)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        p, u = self._gate_inputs(x), self._recurrent_weight()
        if cache is not None:  # a prefill: from the cached state, which the final one overwrites
            states = self._solve(p, u, initial_state=cache["recurrent"].squeeze(-1))
            cache["recurrent"].copy_(states[:, -1, ..., None])
        elif sp is not None or cu_seqlens is not None:  # packed documents: the rows flattened to [1, B*T]
            flat = self._solve(p.reshape(1, B * T, *p.shape[2:]), u,
                               cu_seqlens=sp.cu_seqlens if sp is not None else cu_seqlens, sp=sp)
            states = flat.view(B, T, *flat.shape[2:])
        else:
            states = self._solve(p, u)
        return self._output(states, p, u, x.dtype)

    def decode(self, x: torch.Tensor, cache: dict, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, d_model] -> [B, d_model], the cell's sequential step from the cached state,
        which it advances in place."""
        p, u = self._gate_inputs(x), self._recurrent_weight()
        state = self.cell.step(cache["recurrent"].squeeze(-1), p, u)[0]
        cache["recurrent"].copy_(state[..., None])
        return self._output(state, p, u, x.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The state [B, H, D_h, 1] fp32 (the recurrent cores' layout; independent of max_len)."""
        return {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_dim, 1, dtype=torch.float32,
                                         device=self.recurrent_weight.device)}

    def _solve(self, p: torch.Tensor, u: torch.Tensor, **layout) -> torch.Tensor:
        solver = NewtonSolver(self.cell, self.newton_tol, self.newton_max_iters, **layout)
        states, self.last_newton_iterations = solver.solve(p, u)
        return states

    def _gate_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """p = W x + b: [..., G, H, D_h] fp32 of x [..., d_model]."""
        p = self.in_proj(x).float().unflatten(-1, (self.cell.num_gates, self.num_heads, self.head_dim))
        return p + self.gate_bias.float().view(self.cell.num_gates, self.num_heads, self.head_dim)

    def _recurrent_weight(self) -> torch.Tensor:
        return self.recurrent_weight.float().view(self.cell.num_gates, self.num_heads, self.head_dim)

    def _output(self, states: torch.Tensor, p: torch.Tensor, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.o_proj(self.cell.readout(states, p, u).flatten(-2).to(dtype))


def newton_iterations(model: nn.Module) -> dict[str, float]:
    """The Newton scans of the ParaRNN layers' last forward, for the training metrics: {} without such layers,
    else newton_iters_max and newton_iters_mean over the layers."""
    counts = [m.last_newton_iterations for m in model.modules() if isinstance(m, ParaRNN)]
    if not counts:
        return {}
    return {"newton_iters_max": float(max(counts)), "newton_iters_mean": sum(counts) / len(counts)}


# Per channel and Newton iteration: the cell and its Jacobian (GRU ~30, LSTM ~30 elementwise FLOPs) and the
# residual and scan (4). The LSTM's readout adds ~6 once.
CELL_FLOPS = {"gru": 34, "lstm": 34}
READOUT_FLOPS = {"gru": 0, "lstm": 6}


def pararnn_flops(mixer: ParaRNN, seq_len: int) -> float:
    """Per token: the iterations the last forward took (newton_max_iters before any) times the cell, its
    Jacobian and the scan, plus the readout."""
    iterations = mixer.last_newton_iterations or mixer.newton_max_iters
    name = mixer.cell.name
    return mixer.width * (iterations * CELL_FLOPS[name] + READOUT_FLOPS[name])


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    return cfg.pararnn.recurrent_width(cfg.d_model) // cfg.pararnn.num_heads, 1


for _name, _letter in (("gru", "U"), ("lstm", "L")):
    register(Mixer(f"pararnn_{_name}", _letter, config_key="pararnn", core=DIAGONAL_SCAN_CORE, head_dims=_head_dims,
                   build=lambda cfg, cell=CELLS[_name]: ParaRNN(cfg, cell), flops=pararnn_flops))
