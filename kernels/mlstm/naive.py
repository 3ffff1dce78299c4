"""The mLSTM as the xLSTM paper writes it, one time step at a time: the ground truth (and the CPU decode path).

With i_t the input gate's log (its pre-activation: an exponential gate) and f_t the forget gate's log (<= 0),
per head (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", eqs. 19-27, stabilised):

    m_t = max(f_t + m_{t-1}, i_t)                              the max-stabiliser
    C_t = exp(f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T
    n_t = exp(f_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t = C_t^T q_t / max(|n_t . q_t|, exp(-m_t))               (q scaled by `scale`)

C and n are the memory and normaliser divided by exp(m_t), so no exponential of a gate is ever above 1; h is
the same for every choice of m. The state is (C, n, m) packed as one tensor (kernels/mlstm/state.py); m carries
no gradient (it only chooses the representation).
"""
import torch

from kernels.common import compute_dtype, sequence_bounds
from kernels.mlstm.state import check_mlstm_inputs, pack_state, split_state


def naive_recurrent_mlstm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                          scale: float | None = None, initial_state: torch.Tensor | None = None,
                          output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B,T,H,K]; v [B,T,H,V]; i, f [B,T,H]; states [N,H,K,V+2] (C | n | m)."""
    N = check_mlstm_inputs(q, k, v, i, f, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = compute_dtype(q, k, v, i, f, initial_state)
    q, k, v, i, f = q.to(dtype) * scale, k.to(dtype), v.to(dtype), i.to(dtype), f.to(dtype)
    if initial_state is None:
        initial_state = q.new_zeros(N, H, K, V + 2)
    bounds = sequence_bounds(cu_seqlens, B, T)
    sequences = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
        (0, bos, eos) for bos, eos in zip(bounds, bounds[1:])]
    outputs, finals = [], []
    for n, (row, bos, eos) in enumerate(sequences):
        memory, m = split_state(initial_state[n].to(dtype))  # [H, K, V+1] (C | n), [H]
        for t in range(bos, eos):
            m_new = torch.maximum(f[row, t] + m, i[row, t]).detach()
            forget, write = torch.exp(f[row, t] + m - m_new), torch.exp(i[row, t] - m_new)
            kv = k[row, t][:, :, None] * torch.cat([v[row, t], v.new_ones(H, 1)], -1)[:, None, :]
            memory = forget[:, None, None] * memory + write[:, None, None] * kv
            m = m_new
            numerator, denominator = (q[row, t][:, :, None] * memory).sum(1).split([V, 1], -1)
            outputs.append(numerator / torch.maximum(denominator.abs(), torch.exp(-m)[:, None]))
        finals.append(pack_state(memory, m))
    o = torch.stack(outputs).view(*v.shape) if outputs else v.new_zeros(v.shape)
    return o.to(v.dtype), (torch.stack(finals) if output_final_state else None)
