"""Nonlinear RNNs trained in parallel (ParaRNN: Danieli et al. 2025, arXiv:2510.21450, "ParaRNN: Unlocking Parallel
Training of Nonlinear RNNs for Large Language Models"): GRU- and LSTM-style cells with diagonal recurrent weights,
their T nonlinear steps solved together by Newton's method on a parallel linear scan: the diagonal scan
(kernels/diagonal_scan) for a state of one number per channel, the block-diagonal scan (kernels/block_diagonal_scan)
for the LSTM's two, (h, c).

The mixer: per token the gates' input terms p = W x + b for all tokens at once (one matmul), the recurrence
s_t = f(s_{t-1}, p_t) per channel (u: the diagonal recurrent weights, one vector per gate), out = W_o y.
    GRU (letter U, state h):   z = sigmoid(p_z + u_z h), r = sigmoid(p_r + u_r h), c = tanh(p_c + u_c (r h)),
                               h_t = (1 - z) h + z c;   y_t = h_t
    LSTM (letter L), by model.pararnn.lstm:
      "peephole" (default, state c):  f = sigmoid(p_f + u_f c), i = sigmoid(p_i + u_i c), g = tanh(p_g + u_g c),
                               c_t = f c + i g;   y_t = sigmoid(p_o + u_o c_t) tanh(c_t)
                               The gates read c_{t-1}: one state per channel, a diagonal Jacobian.
      "hc" (the paper's, state (h, c)):  f, i, o = sigmoid(p + u h), g = tanh(p_g + u_g h) (all read h_{t-1}),
                               c_t = f c + i g, h_t = o tanh(c_t);   y_t = h_t
                               Its Jacobian d(h_t, c_t)/d(h_{t-1}, c_{t-1}) is a 2x2 block per channel.
      "cifg" (state (h, c)):   "hc" with the input gate coupled to the forget gate, i = 1 - f (three gates).

Newton: from s^0 = 0, s^{k+1}_t = J_t s^{k+1}_{t-1} + (f(s^k_{t-1}, p_t) - J_t s^k_{t-1}) with the closed-form
Jacobian J_t = df/ds_{t-1} at s^k_{t-1} (diagonal, or 2x2 blocks): one scan per iteration. At a sequence start
s_{t-1} is the initial state (zero, or the cached one), which the scan's initial_state / cu_seqlens give.
Whatever J is used, the fixed point is the same (s = J s + f(s) - J s means s = f(s)), and so is the property that
after k iterations at least the first k tokens of every sequence are exact: J only changes how fast the rest
converges.

Damping (model.pararnn.newton_damping = rho): far from the solution the linearisation about s^k can have |J_t| > 1
over long stretches where the true dynamics contract, and the scan multiplies those factors: from s = 0 the LSTM's
iterates reached 4e6 where the solution is below 500, before converging. In the spirit of ELK's trust region
(Gonzalez et al. 2024, arXiv:2407.19115), the Newton model is trusted only close to the solution: while the last
iteration moved the states by more than TRUST_RADIUS (relative to their largest), each block of J is scaled to a
spectral norm of at most rho (a diagonal J clipped to [-rho, rho]), so the linearised recurrence cannot amplify
and no iterate overshoots by more than the residuals' sum; once an iteration moves them by less, the steps are
plain Newton (quadratic convergence). Neither the fixed point nor the exact prefix changes.

Convergence on the device: an iteration's test (no state moved by more than newton_tol relative to the largest)
stays a device flag; iterations after it are computed but predicated away (torch.where keeps the converged
state), so a forward runs a fixed number of iterations known on the host, reads nothing from the device, and
captures in a CUDA graph or a fullgraph compile. That number, the layer's `newton_plan`, comes from the
tolerance history: newton_max_iters - 1 at first, then, each time the training metrics are read
(newton_iterations(model): one host read for every layer, after the step's loss has been read anyway), the most
any of the last PLAN_WINDOW reads needed plus PLAN_MARGIN; a forward that did not converge within its plan sends
the plan back to the cap. The layer counts on the device the iterations its forwards needed (newton_stats).

Backward: implicit differentiation at the fixed point s*, not Newton unrolled. The iterations run without
autograd; one last Newton step runs with it, its Jacobian (undamped) and s*_{t-1} detached: its value is s* (to
the tolerance), and its gradient is lambda^T df/d(p, u, s_0) with lambda the solution of the transposed system
lambda_t = dL/ds_t + J_{t+1}^T lambda_{t+1}, which is exactly the scan's own backward (the reverse-time transposed
scan, with cu_seqlens and across sequence-parallel ranks). So the backward is one reverse scan and one backward
through the cell at s*, whatever the number of iterations.

Sequence parallelism: each iteration is a scan across ranks (sp.scan with the scan's core), the previous rank's
last state reaches a slice's first token through sp.halo, and the convergence test is all-reduced over the sp group
(a collective, not a host read) so every rank's flag, counts and plan agree.
"""
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from kernels.block_diagonal_scan import chunk_block_diagonal_scan, combine_block_diagonal_states
from kernels.block_diagonal_scan.core_form import (block_diagonal_scan_kv_state_summary, chunk_block_diagonal_scan_kv,
                                                   fused_recurrent_block_diagonal_scan_kv)
from kernels.diagonal_scan import chunk_diagonal_scan
from model.config import ModelConfig
from model.registry import Mixer, RecurrentCore, register
# The diagonal scan in the recurrent cores' form (h_t = a_t h_{t-1} + k_t v_t per channel), as the RG-LRU
# registered it: sequence parallelism runs each Newton step through it with k = the residual, v = 1.
from model.rglru import RGLRU_CORE as DIAGONAL_SCAN_CORE

# The block-diagonal scan in the same form (states [N, H, D, 2], a 2x2 transition per channel and its combine).
BLOCK_DIAGONAL_SCAN_CORE = RecurrentCore("block_diagonal_scan", chunk=chunk_block_diagonal_scan_kv,
                                         decode=fused_recurrent_block_diagonal_scan_kv,
                                         state_summary=block_diagonal_scan_kv_state_summary,
                                         combine=combine_block_diagonal_states)

RECURRENT_WEIGHT_BOUND = 0.5  # u starts uniform in [-bound, bound]: Jacobians of order one, Newton converges fast
TRUST_RADIUS = 0.1  # damped steps until an iteration moves the states by less than this, relative to the largest
PLAN_WINDOW = 16  # metric reads whose iterations the plan covers
PLAN_MARGIN = 1  # iterations planned beyond the most those needed


@dataclass(frozen=True)
class Cell:
    """A recurrent cell with a diagonal or 2x2 block-diagonal Jacobian: step(s_prev, p, u) -> (s_t, ds_t/ds_prev)
    for gate inputs p [..., G, H, D] (u [G, H, D]) and states [..., H, D] (state_size 1; Jacobian [..., H, D]) or
    [..., H, D, 2] (state_size 2; Jacobian [..., H, D, 2, 2]); readout(s_t, p, u) -> the output y_t [..., H, D]."""
    name: str
    num_gates: int
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    readout: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    forget_bias: float = 0.0  # the bias of gate 0 at init (the LSTM's forget gate starts open)
    state_size: int = 1

    def zeros(self, *shape: int, like: torch.Tensor) -> torch.Tensor:
        """A zero state [*shape(, 2)] (shape ending in H, D) in like's dtype and device."""
        return like.new_zeros(*shape, *(() if self.state_size == 1 else (2,)))


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


def lstm_hc_step(state: torch.Tensor, p: torch.Tensor, u: torch.Tensor,
                 coupled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM through h and c (state [..., H, D, 2] = (h, c)); coupled: i = 1 - f (CIFG, gates f, g, o)."""
    h, c = state.unbind(-1)
    if coupled:
        (p_f, p_g, p_o), (u_f, u_g, u_o) = p.unbind(-3), u.unbind(0)
    else:
        (p_f, p_i, p_g, p_o), (u_f, u_i, u_g, u_o) = p.unbind(-3), u.unbind(0)
    f = torch.sigmoid(p_f + u_f * h)
    i = 1 - f if coupled else torch.sigmoid(p_i + u_i * h)
    g = torch.tanh(p_g + u_g * h)
    o = torch.sigmoid(p_o + u_o * h)
    c_t = f * c + i * g
    tanh_c = torch.tanh(c_t)
    h_t = o * tanh_c
    df = f * (1 - f) * u_f
    dc_dh = df * (c - g) if coupled else df * c + i * (1 - i) * u_i * g
    dc_dh = dc_dh + i * (1 - g * g) * u_g
    dtanh = o * (1 - tanh_c * tanh_c)
    dh_dh = o * (1 - o) * u_o * tanh_c + dtanh * dc_dh
    jacobian = torch.stack([torch.stack([dh_dh, dtanh * f], -1), torch.stack([dc_dh, f], -1)], -2)
    return torch.stack([h_t, c_t], -1), jacobian


def lstm_cifg_step(state: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lstm_hc_step(state, p, u, coupled=True)


def hidden_readout(state: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return state.select(-1, 0)


CELLS = {"gru": Cell("gru", 3, gru_step, readout=lambda h, p, u: h),
         "lstm": Cell("lstm", 4, lstm_step, readout=lstm_readout, forget_bias=1.0),
         "lstm_hc": Cell("lstm_hc", 4, lstm_hc_step, readout=hidden_readout, forget_bias=1.0, state_size=2),
         "lstm_cifg": Cell("lstm_cifg", 3, lstm_cifg_step, readout=hidden_readout, forget_bias=1.0, state_size=2)}
LSTM_CELLS = {"peephole": "lstm", "hc": "lstm_hc", "cifg": "lstm_cifg"}  # model.pararnn.lstm -> the L cell


def sequential_states(cell: Cell, p: torch.Tensor, u: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: the cell stepped token by token. p [B, T, G, H, D], u [G, H, D], initial_state [N, H, D(, 2)]
    (N = B, or the sequences of cu_seqlens over B = 1) -> the states [B, T, H, D(, 2)]."""
    B, T = p.shape[:2]
    starts = _sequence_starts(cu_seqlens, T, p.device) if cu_seqlens is not None else None
    first = initial_state if initial_state is not None else cell.zeros(
        B if cu_seqlens is None else cu_seqlens.numel() - 1, *p.shape[-2:], like=p)
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


def _along(mask: torch.Tensor, like: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """mask [n] viewed to broadcast along `axis` of like."""
    return mask.view(*(1,) * axis, -1, *(1,) * (like.dim() - axis - 1))


def damp(jacobian: torch.Tensor, bound: float, block: bool, damped: torch.Tensor) -> torch.Tensor:
    """Where `damped` (a device flag), the Jacobian with every block's spectral norm at most `bound`: a diagonal
    one clipped to [-bound, bound], a 2x2 block scaled down (its largest singular value is
    sqrt((|J|_F^2 + sqrt(|J|_F^4 - 4 det^2)) / 2)); else the Jacobian itself."""
    if not block:
        return torch.where(damped, jacobian.clamp(-bound, bound), jacobian)
    frobenius = jacobian.square().sum((-1, -2))
    det = jacobian[..., 0, 0] * jacobian[..., 1, 1] - jacobian[..., 0, 1] * jacobian[..., 1, 0]
    largest = ((frobenius + (frobenius.square() - 4 * det.square()).clamp_min(0).sqrt()) / 2).sqrt()
    return jacobian * torch.where(damped, bound / largest.clamp_min(bound), 1.0)[..., None, None]


def matvec(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """a [..., 2, 2] times h [..., 2] per channel."""
    return a[..., 0] * h[..., None, 0] + a[..., 1] * h[..., None, 1]


class NewtonSolver:
    """Solves s_t = f(s_{t-1}, p_t) over [B, T] for one layout: rows (B sequences from initial_state), packed
    documents (B = 1, cu_seqlens, initial_state [N, H, D(, 2)]), or one sequence-parallel slice (sp).
    max_iters: the scans at most, the differentiable one included; iterations: the Newton iterations a solve runs
    without autograd (default max_iters - 1: every one the cap allows), those after convergence predicated away;
    damping: the Jacobian's bound far from the solution (None: plain Newton)."""

    def __init__(self, cell: Cell, tol: float, max_iters: int, initial_state: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None, sp=None, damping: Optional[float] = 1.0,
                 iterations: Optional[int] = None):
        self.cell, self.tol, self.damping = cell, tol, damping
        self.iterations = max_iters - 1 if iterations is None else min(iterations, max_iters - 1)
        self.initial_state, self.cu_seqlens, self.sp = initial_state, cu_seqlens, sp
        self.block = cell.state_size == 2
        self.changes: Optional[torch.Tensor] = None  # [iterations] the largest change of each (0 once converged)
        self.converged: Optional[torch.Tensor] = None  # bool, on the device

    def solve(self, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p [B, T, G, H, D] fp32 -> (the states [B, T, H, D(, 2)] fp32, the scans convergence took, the last one
        included: an int64 device tensor). No host read."""
        h = self.cell.zeros(*p.shape[:2], *p.shape[-2:], like=p)
        done = torch.zeros((), dtype=torch.bool, device=p.device)
        needed = torch.zeros((), dtype=torch.long, device=p.device)
        last_change = torch.full((), float("inf"), device=p.device)
        changes = []
        with torch.no_grad():
            initial_state = self._detached(self.initial_state)
            for _ in range(self.iterations):
                damped = None if self.damping is None else last_change >= TRUST_RADIUS
                h_next = self._newton_step(h, p, u, initial_state, damped=damped)
                change = self._max_change(h_next, h)
                h = torch.where(done, h, h_next)
                needed = needed + (~done).long()
                changes.append(torch.where(done, 0.0, change))
                last_change = torch.where(done, last_change, change)
                done = done | (change < self.tol)
        self.changes = torch.stack(changes) if changes else p.new_zeros(0)
        self.converged = done
        # The differentiable step at the solution: its backward is the implicit-function gradient.
        return self._newton_step(h, p, u, self.initial_state, differentiable=True), needed + 1

    def _newton_step(self, h: torch.Tensor, p: torch.Tensor, u: torch.Tensor, initial_state: Optional[torch.Tensor],
                     differentiable: bool = False, damped: Optional[torch.Tensor] = None) -> torch.Tensor:
        previous = self._previous(h, initial_state)
        value, jacobian = self.cell.step(previous, p, u)
        if differentiable:
            jacobian = jacobian.detach()
        elif damped is not None:
            jacobian = damp(jacobian, self.damping, self.block, damped)
        if self.block:
            residual = value - matvec(jacobian, previous)
            if self.sp is not None:
                return self.sp.scan(BLOCK_DIAGONAL_SCAN_CORE, residual, residual, torch.ones_like(residual),
                                    a=jacobian)
            return chunk_block_diagonal_scan(jacobian, residual, initial_state, False, self.cu_seqlens)[0]
        residual = value - jacobian * previous
        if self.sp is not None:
            return self.sp.scan(DIAGONAL_SCAN_CORE, residual, residual, torch.ones_like(residual), a=jacobian)
        return chunk_diagonal_scan(jacobian, residual, initial_state, False, self.cu_seqlens)[0]

    def _previous(self, h: torch.Tensor, initial_state: Optional[torch.Tensor]) -> torch.Tensor:
        """s_{t-1} for every token: s shifted by one, the sequence's incoming state at each sequence start."""
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
        return torch.where(_along(starts, h), initial_state[sequence][None].to(h.dtype), shifted)

    def _previous_across_ranks(self, h: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
        """Under sp (h [1, B*T_local, H, D(, 2)]): a row's first token continues from the previous rank's last
        state (sp.halo: zero where the row starts a document here); every other sequence start from zero."""
        sp = self.sp
        rows = h.detach().reshape(sp.batch_size, sp.seq_len, *h.shape[2:])
        incoming = sp.halo(rows, 1)[:, 0]  # [B, H, D(, 2)]
        segment_starts = sp.cu_seqlens[:-1].long()
        row_start = segment_starts % sp.seq_len == 0
        row = (segment_starts // sp.seq_len).clamp(max=sp.batch_size - 1)
        per_segment = incoming[row] * _along(row_start, incoming, 0).to(h.dtype)
        starts, sequence = _sequence_starts(sp.cu_seqlens, h.shape[1], h.device)
        return torch.where(_along(starts, h), per_segment[sequence][None], shifted)

    def _max_change(self, h_next: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The largest change of any state relative to the largest state (at least 1), over every rank of the sp
        group (all ranks stop together), as a device scalar. Relative, because fp32 rounding alone moves a state of
        magnitude 100 by about 1e-5 per iteration: an absolute tolerance would never be met."""
        if not h.numel():
            return h.new_zeros(())
        change = (h_next - h).abs().amax() / h_next.abs().amax().clamp_min(1.0)
        change = torch.where(change.isnan(), float("inf"), change)  # a NaN never converges (nor passes for 0)
        if self.sp is not None:
            dist.all_reduce(change, op=dist.ReduceOp.MAX, group=self.sp.group)
        return change

    @staticmethod
    def _detached(state: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if state is None else state.detach()


class ParaRNN(nn.Module):
    """A GRU or LSTM cell with diagonal recurrent weights (see the module docstring) between an input and an output
    projection. `newton_plan`: the Newton iterations its forwards run (host-known); `newton_stats` (a device buffer):
    the scans its last forward needed, the most any forward needed and whether one did not converge since the
    metrics last read them (newton_iterations(model))."""

    def __init__(self, cfg: ModelConfig, cell: Cell):
        super().__init__()
        c = cfg.pararnn
        self.cell = cell
        self.width = c.recurrent_width(cfg.d_model)
        self.num_heads = c.num_heads
        self.head_dim = self.width // c.num_heads
        self.newton_tol, self.newton_max_iters, self.newton_damping = c.newton_tol, c.newton_max_iters, c.newton_damping
        self.newton_plan = self.newton_max_iters - 1
        self._recent_needs: deque = deque(maxlen=PLAN_WINDOW)
        self.in_proj = nn.Linear(cfg.d_model, cell.num_gates * self.width, bias=False)
        self.recurrent_weight = nn.Parameter(torch.empty(cell.num_gates, self.width))  # u, one vector per gate
        self.gate_bias = nn.Parameter(torch.empty(cell.num_gates, self.width))
        self.o_proj = nn.Linear(self.width, cfg.d_model, bias=False)
        self.register_buffer("newton_stats", torch.zeros(3, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """u uniform in [-RECURRENT_WEIGHT_BOUND, RECURRENT_WEIGHT_BOUND], biases zero but the forget gate's. In place
        only (sharded parameters after a meta build)."""
        with torch.no_grad():
            self.recurrent_weight.uniform_(-RECURRENT_WEIGHT_BOUND, RECURRENT_WEIGHT_BOUND)
            self.gate_bias.zero_()
            self.gate_bias[0].fill_(self.cell.forget_bias)
            self.newton_stats.zero_()

    @property
    def last_newton_iterations(self) -> int:
        """The scans the last forward needed (a host read: for tests and benchmarks)."""
        return int(self.newton_stats[0])

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        p, u = self._gate_inputs(x), self._recurrent_weight()
        if cache is not None:  # a prefill: from the cached state, which the final one overwrites
            states = self._solve(p, u, initial_state=self._cached_state(cache))
            self._write_cache(cache, states[:, -1])
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
        state = self.cell.step(self._cached_state(cache), p, u)[0]
        self._write_cache(cache, state)
        return self._output(state, p, u, x.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The state [B, H, D_h, 1] fp32, or [B, H, D_h, 2] = (h, c) for the LSTM through h and c (the recurrent
        cores' layout; independent of max_len)."""
        return {"recurrent": torch.zeros(batch_size, self.num_heads, self.head_dim, self.cell.state_size,
                                         dtype=torch.float32, device=self.recurrent_weight.device)}

    def _cached_state(self, cache: dict) -> torch.Tensor:
        return cache["recurrent"].squeeze(-1) if self.cell.state_size == 1 else cache["recurrent"]

    def _write_cache(self, cache: dict, state: torch.Tensor) -> None:
        cache["recurrent"].copy_(state[..., None] if self.cell.state_size == 1 else state)

    def _solve(self, p: torch.Tensor, u: torch.Tensor, **layout) -> torch.Tensor:
        solver = NewtonSolver(self.cell, self.newton_tol, self.newton_max_iters, damping=self.newton_damping,
                              iterations=self.newton_plan, **layout)
        states, needed = solver.solve(p, u)
        stats = self.newton_stats  # on the device: the metrics read them (newton_iterations)
        stats.copy_(torch.stack([needed, torch.maximum(stats[1], needed),
                                 torch.maximum(stats[2], (~solver.converged).long())]))
        return states

    def adapt_plan(self, needed: int, unconverged: bool) -> None:
        """The plan after the metrics read `needed` (the most scans a forward needed since the last read, 0: none
        ran) and whether one did not converge within its plan."""
        cap = self.newton_max_iters - 1
        if unconverged:  # how many it needs is unknown: the cap, until a forward measures it
            self._recent_needs.clear()
            self.newton_plan = cap
        elif needed:
            self._recent_needs.append(needed - 1)  # the iterations without autograd
            self.newton_plan = min(cap, max(self._recent_needs) + PLAN_MARGIN)

    def _gate_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """p = W x + b: [..., G, H, D_h] fp32 of x [..., d_model]."""
        p = self.in_proj(x).float().unflatten(-1, (self.cell.num_gates, self.num_heads, self.head_dim))
        return p + self.gate_bias.float().view(self.cell.num_gates, self.num_heads, self.head_dim)

    def _recurrent_weight(self) -> torch.Tensor:
        return self.recurrent_weight.float().view(self.cell.num_gates, self.num_heads, self.head_dim)

    def _output(self, states: torch.Tensor, p: torch.Tensor, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.o_proj(self.cell.readout(states, p, u).flatten(-2).to(dtype))


def newton_iterations(model: nn.Module, adapt: bool = True) -> dict[str, float]:
    """The Newton iterations of the ParaRNN layers since the last call, for the training metrics: {} without such
    layers, else newton_iters_max and newton_iters_mean over the layers (the scans convergence needed, the
    differentiable one included), newton_scans_max (the scans the forwards ran: the plan) and newton_unconverged
    (layers with a forward that did not converge within its plan). One host read for all layers; with adapt, each
    layer's plan then follows (ParaRNN.adapt_plan). Call it on every rank of an sp group alike."""
    layers = [m for m in model.modules() if isinstance(m, ParaRNN)]
    if not layers:
        return {}
    stats = torch.stack([m.newton_stats for m in layers]).tolist()
    scans = max(m.newton_plan + 1 for m in layers)
    for layer, (_, needed, unconverged) in zip(layers, stats):
        layer.newton_stats[1:].zero_()
        if adapt:
            layer.adapt_plan(needed, bool(unconverged))
    needed = [row[1] or row[0] for row in stats]
    return {"newton_iters_max": float(max(needed)), "newton_iters_mean": sum(needed) / len(needed),
            "newton_scans_max": float(scans), "newton_unconverged": float(sum(row[2] for row in stats))}


# Per channel and Newton iteration: the cell and its Jacobian and the residual and scan (diagonal: ~30 + 4; the LSTM
# through h and c: ~45 for the cell and its 2x2 Jacobian, 8 for the residual and 12 for the 2x2 scan). The peephole
# LSTM's readout adds ~6 once.
CELL_FLOPS = {"gru": 34, "lstm": 34, "lstm_hc": 65, "lstm_cifg": 60}
READOUT_FLOPS = {"gru": 0, "lstm": 6, "lstm_hc": 0, "lstm_cifg": 0}


def pararnn_flops(mixer: ParaRNN, seq_len: int) -> float:
    """Per token: the scans a forward runs (its plan, and the differentiable one) times the cell, its Jacobian and
    the scan, plus the readout."""
    name = mixer.cell.name
    return mixer.width * ((mixer.newton_plan + 1) * CELL_FLOPS[name] + READOUT_FLOPS[name])


def lstm_cell(cfg: ModelConfig) -> Cell:
    """The L cell model.pararnn.lstm names."""
    return CELLS[LSTM_CELLS[cfg.pararnn.lstm]]


def _head_dims(cfg: ModelConfig, letter: str) -> tuple[int, int]:
    state_size = lstm_cell(cfg).state_size if letter == "L" else 1
    return cfg.pararnn.recurrent_width(cfg.d_model) // cfg.pararnn.num_heads, state_size


register(Mixer("pararnn_gru", "U", config_key="pararnn", core=DIAGONAL_SCAN_CORE,
               head_dims=lambda cfg: _head_dims(cfg, "U"), build=lambda cfg: ParaRNN(cfg, CELLS["gru"]),
               flops=pararnn_flops))
# The L mixer's registered core is the diagonal scan's (the default peephole cell); with model.pararnn.lstm = "hc"
# or "cifg" its Newton steps run the block-diagonal scan (BLOCK_DIAGONAL_SCAN_CORE under sp).
register(Mixer("pararnn_lstm", "L", config_key="pararnn", core=DIAGONAL_SCAN_CORE,
               head_dims=lambda cfg: _head_dims(cfg, "L"), build=lambda cfg: ParaRNN(cfg, lstm_cell(cfg)),
               flops=pararnn_flops))
