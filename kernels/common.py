"""Helpers shared by the recurrent ops: input checks, and the chunk layout of packed sequences.

Sequences (the rows of a batch, or the documents of cu_seqlens) are cut into chunks that start at
each sequence's own first token, so a chunk never spans two sequences. The PyTorch paths gather the
tokens into a [num_chunks, chunk_size] layout (the tail of each sequence's last chunk is zero) and run
the state scan over a [num_seqs, max_chunks] grid; the Triton kernels get the same chunk list as
(sequence, chunk) index pairs.
"""
from dataclasses import dataclass

import torch


def check_recurrent_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> int:
    """Validate the shared part of the state contract; returns N, the number of sequences."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if cu_seqlens is None:
        N = B
    else:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [N+1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (flattened sequences), got B={B}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [N, H, K, V] = [{N}, {H}, {K}, {v.shape[-1]}], "
                         f"got {tuple(initial_state.shape)}")
    return N


def sequence_bounds(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[int]:
    """Offsets of the sequences in the flattened [B*T] token axis: the rows, or cu_seqlens."""
    if cu_seqlens is None:
        return [b * seq_len for b in range(batch + 1)]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != batch * seq_len or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {batch * seq_len}, got {bounds}")
    return bounds


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 (the tests' ground truth)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


NEGLIGIBLE_LOG_DECAY = -60.0  # below e^-60 a decayed term is dropped: far under fp32/fp64 rounding of O(1) terms


def decay_or_zero(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay), exactly 0 where it is below e^-60. Never a denormal number: x86 CPUs compute with
    denormals some 100x slower, and long sequences decay into them (e^-87 and below in fp32)."""
    kept = log_decay > NEGLIGIBLE_LOG_DECAY
    return torch.where(kept, torch.exp(log_decay.clamp(min=NEGLIGIBLE_LOG_DECAY)), 0.0)


@dataclass
class ChunkLayout:
    """Where each token and each chunk goes in the chunked layout (PyTorch paths)."""
    chunk_size: int
    num_seqs: int
    num_chunks: int        # over all sequences
    max_chunks: int        # of the longest sequence: the length of the state scan
    token_slot: torch.Tensor  # [num_tokens] long: position of each token in the [num_chunks * chunk_size] layout
    chunk_slot: torch.Tensor  # [num_chunks] long: position of each chunk in the [num_seqs * max_chunks] grid

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, ...] -> [num_chunks, chunk_size, ...], zeros after each sequence's end."""
        out = x.new_zeros(self.num_chunks * self.chunk_size, *x.shape[1:])
        return out.index_copy(0, self.token_slot, x).view(self.num_chunks, self.chunk_size, *x.shape[1:])

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        """[num_chunks, chunk_size, ...] -> [num_tokens, ...]."""
        return y.reshape(self.num_chunks * self.chunk_size, *y.shape[2:]).index_select(0, self.token_slot)

    def to_grid(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """[num_chunks, ...] -> [num_seqs, max_chunks, ...]; slots past a sequence's end hold `fill`
        (choose the identity of the scan, so the final state passes through them unchanged)."""
        out = x.new_full((self.num_seqs * self.max_chunks, *x.shape[1:]), fill)
        return out.index_copy(0, self.chunk_slot, x).view(self.num_seqs, self.max_chunks, *x.shape[1:])

    def from_grid(self, y: torch.Tensor) -> torch.Tensor:
        """[num_seqs, max_chunks, ...] -> [num_chunks, ...]."""
        return y.reshape(self.num_seqs * self.max_chunks, *y.shape[2:]).index_select(0, self.chunk_slot)


def chunk_layout(bounds: list[int], chunk_size: int, device: torch.device | str) -> ChunkLayout:
    """Chunk layout of the sequences [bounds[i], bounds[i+1]) of a flattened token axis."""
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.long)
    num_seqs = lengths.numel()
    chunks = (lengths + chunk_size - 1) // chunk_size
    chunk_start = torch.cumsum(chunks, 0) - chunks  # first chunk of each sequence
    seq_start = torch.tensor(bounds[:-1], dtype=torch.long)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), lengths)
    token_offset = torch.arange(int(lengths.sum())) - seq_start[seq_of_token]
    token_slot = chunk_start[seq_of_token] * chunk_size + token_offset
    max_chunks = int(chunks.max()) if num_seqs else 0
    seq_of_chunk = torch.repeat_interleave(torch.arange(num_seqs), chunks)
    chunk_slot = seq_of_chunk * max_chunks + torch.arange(int(chunks.sum())) - chunk_start[seq_of_chunk]
    return ChunkLayout(chunk_size, num_seqs, int(chunks.sum()), max_chunks,
                       token_slot.to(device), chunk_slot.to(device))


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """int32 [num_chunks, 2]: (sequence, chunk within the sequence) of every chunk, sequence-major
    (the Triton kernels' grid over chunks of packed sequences)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    chunks = (lengths + chunk_size - 1) // chunk_size
    seq = torch.repeat_interleave(torch.arange(len(chunks), device=cu_seqlens.device), chunks)
    first = torch.cumsum(chunks, 0) - chunks
    within = torch.arange(len(seq), device=cu_seqlens.device) - first[seq]
    return torch.stack([seq, within], 1).to(torch.int32).contiguous()


def prepare_chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """int32 [N+1]: index of each sequence's first chunk in the list of all chunks (and the total)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    chunks = (lengths + chunk_size - 1) // chunk_size
    return torch.cat([chunks.new_zeros(1), torch.cumsum(chunks, 0)]).to(torch.int32)
