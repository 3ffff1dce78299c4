"""The Triton recurrent ops as PyTorch custom ops (torch.library), with their backward as a second op.

torch.compile then treats each op as one opaque call (it neither traces into the Triton launches and their
autotuners nor breaks the graph on the host-side chunk index), and eager mode runs the same ops. Every op
has the state contract's arguments, its gates as a list (GLA: [g]; the delta rule: [g, beta]), and one flag
for the forward schedule: chunkwise, or the fused recurrent kernel (decode), both with the chunkwise backward.
An op family's triton_chunk.py registers the op with its chunk forward and backward; its fused_recurrent.py
adds the decode forward (`op.decode_forward = ...`), so neither module imports the other.
"""
import torch

from kernels.common.chunks import chunk_index

FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor[] gates, Tensor? initial_state, Tensor? cu_seqlens, "
                  "float scale, bool output_final_state, bool recurrent) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor[] gates, Tensor? initial_state, Tensor? cu_seqlens, "
                   "float scale, Tensor do, Tensor? d_final_state) -> (Tensor, Tensor, Tensor, Tensor[], Tensor)")


def _no_state(x: torch.Tensor) -> torch.Tensor:
    """What stands for an absent state: ops cannot return None. (Every output is contiguous: what the fake
    implementations promise the compiler.)"""
    return x.new_empty(0, dtype=torch.float32)


class RecurrentOp:
    """baton::<name> and baton::<name>_backward, called as
    op(q, k, v, gates, initial_state, cu_seqlens, scale, output_final_state, recurrent) -> (o, final or None).

    chunk_forward and decode_forward: (q, k, v, gates, initial_state, chunks, scale, output_final_state) ->
    (o, final or None); backward: (q, k, v, gates, initial_state, chunks, scale, do, d_final_state) ->
    (dq, dk, dv, dgates, d_initial or None); chunks is the call's ChunkIndex."""

    def __init__(self, name: str, chunk_forward, backward):
        self.decode_forward = None  # set by the family's fused_recurrent module
        self._call, self._backward = _register(name, self, chunk_forward, backward)

    def __call__(self, q, k, v, gates, initial_state, cu_seqlens, scale, output_final_state, recurrent):
        return self._call(q, k, v, gates, initial_state, cu_seqlens, scale, output_final_state, recurrent)

    def vjp(self, q, k, v, gates, cu_seqlens, scale, do, initial_state=None):
        """(dq, dk, dv, dgates, d initial_state or None) of a call without a final state, for the output gradient
        do: the backward op alone, the forward not run again (what recomputation around a scan needs)."""
        dq, dk, dv, dgates, d_initial = self._backward(q, k, v, gates, initial_state, cu_seqlens, scale,
                                                       do.contiguous(), None)
        return dq, dk, dv, list(dgates), None if initial_state is None else d_initial


def _register(name: str, family: RecurrentOp, chunk_forward, backward):
    def forward_op(q, k, v, gates, initial_state, cu_seqlens, scale, output_final_state, recurrent):
        chunks = chunk_index(cu_seqlens, q.shape[0], q.shape[1], q.device)
        forward = family.decode_forward if recurrent else chunk_forward
        o, final = forward(q, k, v, gates, initial_state, chunks, scale, output_final_state)
        return o.contiguous(), _no_state(q) if final is None else final.contiguous()

    def forward_fake(q, k, v, gates, initial_state, cu_seqlens, scale, output_final_state, recurrent):
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        final = q.new_empty(N, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
        return v.new_empty(v.shape), final if output_final_state else _no_state(q)

    def backward_op(q, k, v, gates, initial_state, cu_seqlens, scale, do, d_final_state):
        chunks = chunk_index(cu_seqlens, q.shape[0], q.shape[1], q.device)
        dq, dk, dv, dgates, d_initial = backward(q, k, v, gates, initial_state, chunks, scale, do, d_final_state)
        return (dq.contiguous(), dk.contiguous(), dv.contiguous(), [dg.contiguous() for dg in dgates],
                _no_state(q) if d_initial is None else d_initial.contiguous())

    def backward_fake(q, k, v, gates, initial_state, cu_seqlens, scale, do, d_final_state):
        d_initial = _no_state(q) if initial_state is None else initial_state.new_empty(initial_state.shape)
        dgates = [g.new_empty(g.shape) for g in gates]
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgates, d_initial

    op = torch.library.custom_op(f"baton::{name}", forward_op, mutates_args=(), schema=FORWARD_SCHEMA)
    op.register_fake(forward_fake)
    backward_of = torch.library.custom_op(f"baton::{name}_backward", backward_op, mutates_args=(),
                                          schema=BACKWARD_SCHEMA)
    backward_of.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        q, k, v, gates, initial_state, cu_seqlens, scale, _, _ = inputs
        ctx.save_for_backward(q, k, v, initial_state, cu_seqlens, *gates)
        ctx.scale = scale

    def differentiate(ctx, do, d_final_state):
        q, k, v, initial_state, cu_seqlens, *gates = ctx.saved_tensors
        if d_final_state is not None and d_final_state.numel() == 0:
            d_final_state = None
        dq, dk, dv, dgates, d_initial = backward_of(q, k, v, gates, initial_state, cu_seqlens, ctx.scale,
                                                    do.contiguous(), d_final_state)
        return dq, dk, dv, dgates, None if initial_state is None else d_initial, None, None, None, None

    op.register_autograd(differentiate, setup_context=setup_context)

    def call(q, k, v, gates, initial_state, cu_seqlens, scale, output_final_state, recurrent):
        o, final = op(q, k, v, gates, initial_state, cu_seqlens, scale, output_final_state, recurrent)
        return o, final if output_final_state else None
    return call, backward_of
