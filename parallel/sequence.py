"""Sequence parallelism for recurrent and hybrid models: the `sp` object the model's mixers call.

Each rank of an sp group holds the same rows, rank r the contiguous slice [r*T, (r+1)*T) of every row
(T = local length). Layers that only look at their own token (norms, MLPs) need nothing. The others:

- recurrent cores (GLA, Mamba2, the delta-rule mixers) are affine in the incoming state, S_out = M S_in + S_local,
  so a state-only summary of the slice gives its (M, S_local) (M diagonal for GLA and Mamba2), a
  differentiable all_gather gives every rank's, a prefix combine gives this slice's incoming state, and the
  op run from it gives the outputs. Communication per layer is O(H K V) per row, independent of T.
- bidirectional layers (LION, bidirectional GLA / Mamba2: kernels/lion) add the backward direction
  (`scan_reverse`): the same summaries of each slice's reversed first segment and a suffix combine give the state
  every later rank leaves, and the op runs on the reversed slice from it.
- short causal convolutions take the (W-1)-token halo of the previous rank(s) as their initial state;
- attention all-gathers K and V (full attention), or takes only the previous rank's last window-1 keys.

Backward needs nothing hand-written beyond the collectives' own: autograd through the ops (d initial_state)
and through the collectives carries every gradient to the rank that owns the input. (Training's recomputation
around the scan, model/recurrent.py mix, calls `incoming_state` in its forward and again in its backward, there
under autograd from the d initial_state of the scan's backward.) Documents are respected
throughout: a document start inside a slice cuts the state, exactly as cu_seqlens does in one process.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from kernels import causal_conv1d
from kernels.lion.sequences import backward_gates, reverse_sequences
from model.attention import document_starts
from model.registry import RecurrentCore


class CollectiveTimer:
    """Wall-clock seconds spent inside the sp collectives (forward and backward, waits for slower ranks
    included) while `timing_collectives()` is active: how bench/sequence_parallel.py splits a step into
    compute and communication. It synchronises the device around each collective, so it is for measuring only."""

    def __init__(self):
        self.seconds = 0.0


_timer: CollectiveTimer | None = None


@contextlib.contextmanager
def timing_collectives() -> Iterator[CollectiveTimer]:
    global _timer
    _timer = CollectiveTimer()
    try:
        yield _timer
    finally:
        _timer = None


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """Wraps each sp collective: adds its time to the active CollectiveTimer, if any."""
    if _timer is None:
        yield
        return
    timer = _timer
    _synchronize()
    start = time.perf_counter()
    yield
    _synchronize()
    timer.seconds += time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _AllGather(torch.autograd.Function):
    """all_gather into a stacked [R, ...] tensor; the backward sums every rank's gradient of each slice
    into the rank that owns it (a reduce-scatter). torch.distributed.nn's all_gather is not used: on
    gloo its backward names subgroup ranks wrongly."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        gathered = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        with _collective():
            dist.all_gather(gathered, x.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty(grad.shape[1:])
            with _collective():
                dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        grad = grad.clone()  # gloo has no reduce-scatter: sum everything, keep our slice
        with _collective():
            dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


class _ShiftFromPrevious(torch.autograd.Function):
    """Rank r receives rank r-1's tensor (rank 0 receives zeros); the backward sends the gradient back."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _send_to_neighbour(x, group, step=+1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _send_to_neighbour(grad, ctx.group, step=-1), None


def _send_to_neighbour(x: Tensor, group: dist.ProcessGroup, step: int) -> Tensor:
    """Send x to rank r+step of the group and return what rank r-step sent (zeros where there is none)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    x = x.contiguous()
    received = torch.zeros_like(x)
    ops = []
    if 0 <= rank + step < size:
        ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(group, rank + step), group))
    if 0 <= rank - step < size:
        ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(group, rank - step), group))
    if ops:
        with _collective():
            for request in dist.batch_isend_irecv(ops):
                request.wait()
    return received


class SequenceParallel:
    """Per-batch sequence-parallel context of one sp group (see the module docstring).

    Built once per micro-batch from the batch's cu_seqlens (over the flattened B*T local tokens) and
    starts_document [B]; every mixer of the model then calls scan / conv / gather_kv / positions / doc_start.
    Mixers may pass tensors as [B, T, ...] or flattened to [1, B*T, ...]; results come back in that shape.
    """

    def __init__(self, group: dist.ProcessGroup, cu_seqlens: Tensor, starts_document: Tensor):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.batch_size = starts_document.numel()
        total = int(cu_seqlens[-1])
        if total % self.batch_size:
            raise ValueError(f"cu_seqlens ends at {total}, not a multiple of the batch size {self.batch_size}")
        self.seq_len = total // self.batch_size
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        device = cu_seqlens.device
        row_starts = torch.arange(self.batch_size, device=device) * self.seq_len
        seg_starts = self.cu_seqlens[:-1].long()
        # Segment (state) index of each row's first and last segment; only the first can continue a document
        # from the previous rank, only the last hands its state to the next.
        self.first_segment = torch.searchsorted(seg_starts, row_starts)
        self.last_segment = torch.searchsorted(seg_starts, row_starts + self.seq_len) - 1
        if not torch.equal(seg_starts[self.first_segment.clamp(max=seg_starts.numel() - 1)], row_starts):
            raise ValueError("cu_seqlens must contain every row start b*T of the flattened [B*T] local batch")
        starts_document = starts_document.to(device=device, dtype=torch.bool)
        if self.rank == 0 and not bool(starts_document.all()):
            raise ValueError("starts_document must be True for every row on sp rank 0: rows start documents")
        self.continues = ~starts_document
        num_segments = seg_starts.numel()
        # Per segment: its row, and whether it carries the row's incoming state (first segment, continuing).
        self.segment_row = torch.searchsorted(row_starts, seg_starts, right=True) - 1
        self.segment_carries = torch.zeros(num_segments, dtype=torch.bool, device=device)
        self.segment_carries[self.first_segment] = self.continues
        # Only each row's last segment hands a state on: the summaries run on its tokens alone, packed as
        # B sequences (tail_cu_seqlens) gathered from the flattened slice by tail_tokens.
        tail_starts = seg_starts[self.last_segment]
        tail_lengths = row_starts + self.seq_len - tail_starts
        self.tail_cu_seqlens = torch.cat([tail_lengths.new_zeros(1), tail_lengths.cumsum(0)]).to(torch.int32)
        tail_offsets = torch.repeat_interleave(tail_starts - self.tail_cu_seqlens[:-1], tail_lengths)
        self.tail_tokens = tail_offsets + torch.arange(tail_offsets.numel(), device=device)
        # The backward direction (scan_reverse) mirrors this: each row's first segment hands its state to the
        # previous rank, each row's last segment receives the following rank's.
        self.row_starts = row_starts
        head_lengths = self.cu_seqlens.long()[self.first_segment + 1] - row_starts
        self.head_cu_seqlens = torch.cat([head_lengths.new_zeros(1), head_lengths.cumsum(0)]).to(torch.int32)
        head_offsets = torch.repeat_interleave(row_starts - self.head_cu_seqlens[:-1], head_lengths)
        self.head_tokens = head_offsets + torch.arange(head_offsets.numel(), device=device)
        self.segment_is_last = torch.zeros(num_segments, dtype=torch.bool, device=device)
        self.segment_is_last[self.last_segment] = True
        self._doc_start = self._global_document_starts()

    @classmethod
    def from_batch(cls, group: dist.ProcessGroup, batch: dict) -> SequenceParallel:
        return cls(group, batch["cu_seqlens"], batch["starts_document"])

    def _global_document_starts(self) -> Tensor:
        """[B, T] global row position of each token's document start. A start before this slice is the
        last document start of the nearest earlier rank that has one (one all_gather of B integers)."""
        offset = self.rank * self.seq_len
        local = document_starts(self.cu_seqlens, self.batch_size, self.seq_len, self.cu_seqlens.device)
        # In a row that continues a document, the tokens before its first local start (those whose
        # segment "starts" at 0) belong to a document that began on an earlier rank.
        continuing = self.continues[:, None] & (local == 0)
        last = torch.where(continuing[:, -1], -1, local[:, -1] + offset)
        gathered = [torch.empty_like(last) for _ in range(self.size)]
        dist.all_gather(gathered, last, group=self.group)
        # Positions grow with the rank, so the latest earlier start is the max; rank 0 always starts rows.
        incoming = torch.stack(gathered[: self.rank] or [torch.zeros_like(last)]).max(dim=0).values.clamp(min=0)
        return torch.where(continuing, incoming[:, None], local + offset)

    # ----- what the mixers call -------------------------------------------------------------------------

    def positions(self) -> Tensor:
        """[T] global row positions of this slice's tokens (for RoPE)."""
        start = self.rank * self.seq_len
        return torch.arange(start, start + self.seq_len, device=self.cu_seqlens.device)

    def doc_start(self) -> Tensor:
        """[B, T] global row position of the start of each token's document."""
        return self._doc_start

    def scan(self, core: RecurrentCore, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
             **gates: Tensor) -> Tensor:
        """The output of the core's chunked op over this slice, given the state every earlier rank leaves
        (the core a mixer registered, model/registry.py; gates = g, or g and beta)."""
        out_shape = q.shape[:-1] + v.shape[-1:]  # [.., H, V] (v may have more axes: a DeltaProduct's steps)
        q, k, v = self._flat(q), self._flat(k), self._flat(v)
        gates = {name: self._flat(gate) for name, gate in gates.items()}
        initial_state = self.incoming_state(core, k, v, gates)
        o, _ = core.chunk(q, k, v, scale=scale, **gates, initial_state=initial_state, cu_seqlens=self.cu_seqlens)
        return o.reshape(out_shape)

    def incoming_state(self, core: RecurrentCore, k: Tensor, v: Tensor, gates: dict[str, Tensor]) -> Tensor:
        """The initial states [N, ...] of the core's chunked op over this slice (k, v and gates flattened to
        [1, B*T, ...], its segments those of cu_seqlens): the state every earlier rank leaves, in each row's
        first segment where it continues a document, zero elsewhere. Steps 1 and 2 of scan; differentiable,
        its backward carrying d initial_state to k, v, the gates and (all_gather) the earlier ranks."""
        # 1. (S_local, M) of each row's last segment, from the op's state-only summary (no outputs). Only a
        #    first segment continuing a document carries S_in; elsewhere M = 0 (the state was cut).
        tail = lambda x: x.index_select(1, self.tail_tokens)
        local_state, transition = core.state_summary(tail(k), tail(v), **{name: tail(gate) for name, gate in gates.items()},
                                            cu_seqlens=self.tail_cu_seqlens)
        local_state = local_state.float()  # [B, H, K, V]
        carries = self.segment_carries[self.last_segment]
        transition = transition.float()  # [B, H, K, K], or the diagonal [B, H, K] / [B, H]
        transition = transition * carries.view(-1, *(1,) * (transition.dim() - 1))
        if transition.dim() == 2:  # a scalar gate per head: the diagonal is one value
            transition = transition.unsqueeze(-1)

        # 2. every rank's summary (one all_gather of both), then the exclusive prefix combine
        #    S_in(j+1) = M_j S_in(j) + S_local(j) (or the core's own combine). Every rank computes all prefixes
        #    and keeps its own, so the gathered tensors are in every rank's graph: the all_gather's backward
        #    (which brings later ranks' gradients here) then runs on all.
        state_size = local_state[0].numel()
        summary = torch.cat([local_state.flatten(1), transition.flatten(1)], dim=1)
        gathered = _AllGather.apply(summary, self.group)
        incoming = [torch.zeros_like(local_state)]
        with torch.autocast(v.device.type, enabled=False):  # states stay fp32 under bf16 autocast
            for rank_summary in gathered[:-1]:
                state_j, transition_j = rank_summary.split([state_size, rank_summary.shape[1] - state_size], dim=1)
                transition_j, state_j = transition_j.view(transition.shape), state_j.view(local_state.shape)
                if core.combine is not None:
                    incoming.append(core.combine(transition_j, state_j, incoming[-1]))
                    continue
                carried = (transition_j @ incoming[-1] if transition_j.dim() == incoming[-1].dim()
                           else transition_j.unsqueeze(-1) * incoming[-1])  # diagonal: scale the rows of S
                incoming.append(carried + state_j)
        return self._to_segments(torch.stack(incoming)[self.rank])

    def scan_reverse(self, core: RecurrentCore, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *,
                     g: Tensor) -> Tensor:
        """The backward direction over this slice, given the states every later rank leaves: o_i = scale q_i^T S^B_i
        with S^B_i = diag(exp(g_{i+1})) S^B_{i+1} + k_i v_i^T within each document (kernels/lion). For a core with
        GLA's diagonal gate g (vector or scalar), whose ops run on the reversed slice (kernels/lion/sequences.py).

        The mirror of scan: each row's first segment, reversed, is summarised (its state at the slice's first
        token and its transition), multiplied by that token's decay exp(g_first) so the previous rank receives
        S^B already decayed into its last token; a suffix combine over the gathered summaries gives the state
        entering each row's last segment from the ranks after, and the reversed op runs from it. A summary passes
        on only when the row continues a document from the previous rank, its transition only when the row's
        first segment is all of it."""
        out_shape = q.shape[:-1] + v.shape[-1:]
        q, k, v, g = self._flat(q), self._flat(k), self._flat(v), self._flat(g)
        rev = lambda x: reverse_sequences(x, self.cu_seqlens)  # noqa: E731
        q_r, k_r, v_r, h_r = rev(q), rev(k), rev(v), rev(backward_gates(g, self.cu_seqlens))

        # 1. each row's first segment, reversed: (S_local, M) into its first token, then decayed by that token.
        head = lambda x: x.index_select(1, self.head_tokens)  # noqa: E731
        local_state, transition = core.state_summary(head(k_r), head(v_r), g=head(h_r),
                                                     cu_seqlens=self.head_cu_seqlens)
        first_decay = g[0].index_select(0, self.row_starts).float().exp()  # [B, H, K] or [B, H]
        local_state = local_state.float() * (first_decay.unsqueeze(-1) if first_decay.dim() == 3
                                             else first_decay[..., None, None])
        passes = self.continues.to(local_state.dtype)
        whole_row = (self.first_segment == self.last_segment).to(local_state.dtype)
        local_state = local_state * passes.view(-1, 1, 1, 1)
        transition = transition.float() * first_decay * (passes * whole_row).view(-1, *(1,) * (first_decay.dim() - 1))
        if transition.dim() == 2:  # a scalar gate per head: the diagonal is one value
            transition = transition.unsqueeze(-1)

        # 2. every rank's summary, then the suffix combine S_in(j-1) = M_j S_in(j) + S_local(j) from the last rank.
        state_size = local_state[0].numel()
        summary = torch.cat([local_state.flatten(1), transition.flatten(1)], dim=1)
        gathered = _AllGather.apply(summary, self.group)
        incoming = [torch.zeros_like(local_state)]  # into the last rank
        with torch.autocast(v.device.type, enabled=False):
            for rank_summary in gathered.flip(0)[:-1]:  # ranks size-1 .. 1, each into the rank before it
                state_j, transition_j = rank_summary.split([state_size, rank_summary.shape[1] - state_size], dim=1)
                incoming.append(transition_j.view(transition.shape).unsqueeze(-1) * incoming[-1]
                                + state_j.view(local_state.shape))
        state_in = torch.stack(incoming)[self.size - 1 - self.rank]

        # 3. the reversed op from it, at each row's last segment (where the reversed segment starts).
        last = self.segment_is_last.view(-1, 1, 1, 1).to(state_in.dtype)
        o_r, _ = core.chunk(q_r, k_r, v_r, scale=scale, g=h_r, initial_state=state_in[self.segment_row] * last,
                            cu_seqlens=self.cu_seqlens)
        return rev(o_r).reshape(out_shape)

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
        """Depthwise causal conv over this slice, its left context taken from the previous rank(s)."""
        out_shape = x.shape
        x = x.reshape(self.batch_size, self.seq_len, -1)
        halo = self.halo(x, weight.shape[-1] - 1)  # [B, W-1, D], zero before the document start
        initial_state = self._to_segments(halo.transpose(1, 2))
        y, _ = causal_conv1d(self._flat(x), weight, bias, activation, initial_state=initial_state,
                             cu_seqlens=self.cu_seqlens)
        return y.reshape(out_shape)

    def gather_kv(self, k: Tensor, v: Tensor, window: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values [B, T_keys, H, D] this slice's queries (k, v: [B, T, H, D]) may attend to, and the
        keys' global row positions [T_keys]; the mixer masks with q_pos, doc_start and the window.

        Full attention: every earlier rank's keys plus ours (one all_gather; later ranks' are dropped).
        A window: only the window-1 keys before the slice, from the previous rank(s).
        """
        kv = torch.cat([k, v], dim=-1)
        start = self.rank * self.seq_len
        if window is None:
            kv_all = _AllGather.apply(kv, self.group)[: self.rank + 1].transpose(0, 1).flatten(1, 2)
            key_start = 0
        else:
            halo_len = window - 1
            kv_all = torch.cat([self.halo(kv, halo_len), kv], dim=1)
            key_start = start - halo_len
        key_pos = torch.arange(key_start, start + self.seq_len, device=k.device)
        k_all, v_all = kv_all.split([k.shape[-1], v.shape[-1]], dim=-1)
        return k_all, v_all, key_pos

    def gather_all_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bidirectional attention: every rank's keys and values [B, size * T, H, D] (one all_gather) and each
        key's document start [B, size * T] in global row positions; a query attends the keys of its own document
        (the same start)."""
        kv = _AllGather.apply(torch.cat([k, v], dim=-1), self.group).transpose(0, 1).flatten(1, 2)
        starts = [torch.empty_like(self._doc_start) for _ in range(self.size)]
        dist.all_gather(starts, self._doc_start.contiguous(), group=self.group)
        k_all, v_all = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
        return k_all, v_all, torch.cat(starts, dim=1)

    def halo(self, x: Tensor, length: int) -> Tensor:
        """[B, length, ...]: the `length` tokens before this slice in each row, zero where they lie before
        the row's start or before the document the slice's first token belongs to. Several hops when a
        slice is shorter than the halo."""
        halo = x.new_zeros(x.shape[0], length, *x.shape[2:])
        if length == 0:
            return halo
        # Each hop reaches one rank further back; no rank has more than size-1 ranks before it. Every
        # rank makes the same number of hops, so the point-to-point calls pair up.
        for _ in range(min(math.ceil(length / self.seq_len), self.size - 1)):
            halo = _ShiftFromPrevious.apply(torch.cat([halo, x], dim=1)[:, -length:], self.group)
        positions = self.rank * self.seq_len - length + torch.arange(length, device=x.device)
        keep = positions[None, :] >= self._doc_start[:, :1]
        return halo * keep.view(*keep.shape, *(1,) * (x.dim() - 2)).to(x.dtype)

    # ----- helpers --------------------------------------------------------------------------------------

    def _flat(self, x: Tensor) -> Tensor:
        """[B, T, ...] or [1, B*T, ...] -> [1, B*T, ...], the layout the ops take with cu_seqlens."""
        return x.reshape(1, self.batch_size * self.seq_len, *x.shape[2:])

    def _to_segments(self, per_row: Tensor) -> Tensor:
        """Per-row states [B, ...] -> initial states [N, ...]: a row's first segment gets its row's state
        when it continues a document, every other segment starts from zero."""
        carries = self.segment_carries.view(-1, *(1,) * (per_row.dim() - 1)).to(per_row.dtype)
        return per_row[self.segment_row] * carries
