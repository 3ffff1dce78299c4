"""The mLSTM state (C, n, m) as the one tensor the state contract passes around: [N, H, K, V + 2], whose
columns are the memory C [K, V], the normaliser n [K] and the stabiliser m (the same in every row of a head).
A zero tensor is the empty state (m = 0), so caches, sequence-parallel starts and document cuts need nothing
of their own. m is detached wherever it is read: it only chooses the representation, h does not depend on it.
"""
import torch

from kernels.common import check_recurrent_inputs


def split_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K, V+2] -> (C | n [..., K, V+1], m [...], detached)."""
    return state[..., :-1], state[..., 0, -1].detach()


def pack_state(memory: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(C | n [..., K, V+1], m [...]) -> [..., K, V+2]."""
    return torch.cat([memory, m[..., None, None].to(memory.dtype).expand(*memory.shape[:-1], 1)], -1)


def check_mlstm_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                       initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> int:
    """The state contract's checks with the mLSTM's packed state and its two gates; returns N."""
    N = check_recurrent_inputs(q, k, v, None, cu_seqlens)
    for name, gate in (("i", i), ("f", f)):
        if gate.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, H] = {list(q.shape[:3])}, got {tuple(gate.shape)}")
    expected = (N, q.shape[2], q.shape[3], v.shape[-1] + 2)
    if initial_state is not None and initial_state.shape != expected:
        raise ValueError(f"initial_state must be [N, H, K, V+2] = {list(expected)} (C | n | m), "
                         f"got {tuple(initial_state.shape)}")
    return N
