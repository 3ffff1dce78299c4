"""The mLSTM of xLSTM (Beck et al. 2024): matrix memory with exponential input gates, forget gates, the
normaliser state and the max-stabiliser (naive.py writes the recurrence out).

    o, final_state = op(q, k, v, i, f, scale, initial_state, output_final_state, cu_seqlens)
    q, k [B, T, H, K]; v, o [B, T, H, V]; i, f [B, T, H] (the gates' logs); states [N, H, K, V+2] = (C | n | m)

Every op is GLA's with the scalar gate on transformed inputs (gla_form.py), so it dispatches as GLA does
(Triton on CUDA, chunked PyTorch elsewhere) and inherits its tests' guarantees; what is the mLSTM's own is the
stabiliser, the normaliser column and the output's division. A decode step without gradients on CUDA runs the
mLSTM's own step kernel instead (fused_recurrent.py), one launch. Sequence parallelism combines two states with
their own stabilisers (combine_mlstm_states), which is affine in the states once the m are fixed.
"""
import torch

from kernels.backend import use_triton
from kernels.common import autograd_vjp
from kernels.gla import chunk_gla, fused_recurrent_gla, gla_state_summary
from kernels.mlstm.gla_form import final_state, gla_inputs, normalised, stabiliser, total_log_forget
from kernels.mlstm.naive import naive_recurrent_mlstm
from kernels.mlstm.state import check_mlstm_inputs, pack_state, split_state

EXPONENT_MAX = 80.0  # exp(80) ~ 6e34: a rescaling factor never overflows fp32 before its zero factor applies


def _through_gla(gla_op, q, k, v, i, f, scale, initial_state, output_final_state, cu_seqlens):
    N = check_mlstm_inputs(q, k, v, i, f, initial_state, cu_seqlens)
    k, v_and_one, g, memory, m, m_end = gla_inputs(k, v, i, f, initial_state, cu_seqlens, N)
    o, memory = gla_op(q, k, v_and_one, g, scale, memory, output_final_state, cu_seqlens)
    return normalised(o, m, v.dtype), final_state(memory, m_end)


def chunk_mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                scale: float | None = None, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise mLSTM for training and prefill (chunk_gla underneath)."""
    return _through_gla(chunk_gla, q, k, v, i, f, scale, initial_state, output_final_state, cu_seqlens)


def chunk_mlstm_vjp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                    do: torch.Tensor, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                    initial_state: torch.Tensor | None = None) -> tuple:
    """chunk_mlstm's input gradients (dq, dk, dv, [di, df], d initial_state or None) for the output gradient do
    (chunk_gla_vjp's contract, for the recomputation around the scan in model/recurrent.py). The output's
    division needs GLA's output, so GLA's forward runs again here (on the Triton path too): one more scan in
    the backward buys not keeping the stabilised inputs, GLA's output and the division's temporaries."""
    dq, dk, dv, di, df, d_initial = autograd_vjp(
        lambda q, k, v, i, f, h0: chunk_mlstm(q, k, v, i, f, scale, h0, False, cu_seqlens)[0], (q, k, v, i, f), do,
        initial_state)
    return dq, dk, dv, [di, df], d_initial


def fused_recurrent_mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                          scale: float | None = None, initial_state: torch.Tensor | None = None,
                          output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step mLSTM for decoding; same contract as chunk_mlstm. Without gradients on CUDA its own Triton
    kernel (fused_recurrent.py: the step in one launch); otherwise fused_recurrent_gla on the GLA form."""
    check_mlstm_inputs(q, k, v, i, f, initial_state, cu_seqlens)
    inputs = (q, k, v, i, f, initial_state)
    if use_triton(q) and not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)):
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        o, final = _step(q, k, v, i, f, initial_state, cu_seqlens, scale, output_final_state)
        return o, final if output_final_state else None
    return _through_gla(fused_recurrent_gla, q, k, v, i, f, scale, initial_state, output_final_state, cu_seqlens)


def _step_op(q, k, v, i, f, initial_state, cu_seqlens, scale, output_final_state):
    from kernels.mlstm.fused_recurrent import fused_recurrent_mlstm_triton
    o, final = fused_recurrent_mlstm_triton(q, k, v, i, f, scale, initial_state, output_final_state, cu_seqlens)
    return o, q.new_empty(0, dtype=torch.float32) if final is None else final  # an op cannot return None


# The Triton step as one custom op (forward only, like rotate_rows): torch.compile treats it as one opaque call.
_step = torch.library.custom_op(
    "baton::mlstm_step", _step_op, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor? initial_state, Tensor? cu_seqlens, "
           "float scale, bool output_final_state) -> (Tensor, Tensor)")


@_step.register_fake
def _(q, k, v, i, f, initial_state, cu_seqlens, scale, output_final_state):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = (q.new_empty(N, q.shape[2], q.shape[3], v.shape[3] + 2, dtype=torch.float32) if output_final_state
             else q.new_empty(0, dtype=torch.float32))
    return v.new_empty(v.shape), final


def mlstm_state_summary(k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                        cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, the final state from the empty one, [N, H, K, V+2], and the memory's transition
    exp(sum of f) [N, H]: for sequence parallelism, whose prefix combine is combine_mlstm_states."""
    N = check_mlstm_inputs(k, k, v, i, f, None, cu_seqlens)
    k, v_and_one, g, _, _, m_end = gla_inputs(k, v, i, f, None, cu_seqlens, N)
    memory, _ = gla_state_summary(k, v_and_one, g, cu_seqlens)
    return pack_state(memory, m_end), torch.exp(total_log_forget(f, cu_seqlens))


def combine_mlstm_states(transition: torch.Tensor, local: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
    """The state after a slice that starts from `incoming` [N, H, K, V+2], given the slice's summary: its final
    state from the empty one, `local`, and its memory's transition [N, H] (0 where a document starts in it).
    In true units C = exp(m) C~ this is C_out = transition C_in + C_local; the result takes the larger
    stabiliser, m_out = max(log transition + m_in, m_local), so both terms are scaled by at most 1."""
    memory_in, m_in = split_state(incoming)
    memory_local, m_local = split_state(local)
    transition = transition.reshape(m_in.shape)
    with torch.no_grad():
        carried = transition > 0
        log_transition = torch.where(carried, transition.clamp_min(torch.finfo(transition.dtype).tiny).log(),
                                     float("-inf"))
        m_out = torch.maximum(log_transition + m_in, m_local)
        in_scale = torch.where(carried, torch.exp((m_in - m_out).clamp(max=EXPONENT_MAX)), 0.0)
        local_scale = torch.exp(m_local - m_out)
    memory = ((transition * in_scale)[..., None, None] * memory_in + local_scale[..., None, None] * memory_local)
    return pack_state(memory, m_out)


__all__ = ["chunk_mlstm", "chunk_mlstm_vjp", "combine_mlstm_states", "fused_recurrent_mlstm", "mlstm_state_summary",
           "naive_recurrent_mlstm", "pack_state", "split_state", "stabiliser"]
