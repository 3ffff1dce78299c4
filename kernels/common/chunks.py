"""Chunks of packed sequences: CHUNK_SIZE (the one definition), the sequence bounds, the PyTorch paths'
chunked layout and the Triton kernels' chunk index.

Sequences (the rows of a batch, or the documents of cu_seqlens) are cut into chunks that start at each
sequence's own first token, so a chunk never spans two sequences. The PyTorch paths gather the tokens into a
[num_chunks, chunk_size] layout (the tail of each sequence's last chunk is zero) and run the state scan over
a [num_seqs, max_chunks] grid; the Triton kernels get the same chunks as a list of (sequence, chunk) pairs.
"""
from dataclasses import dataclass

import torch

CHUNK_SIZE = 64  # tokens per chunk of every chunkwise op (and of their FLOP count, model/flops.py)


def sequence_bounds(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[int]:
    """Offsets of the sequences in the flattened [B*T] token axis: the rows, or cu_seqlens."""
    if cu_seqlens is None:
        return [b * seq_len for b in range(batch + 1)]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != batch * seq_len or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {batch * seq_len}, got {bounds}")
    return bounds


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


class ChunkIndex:
    """The chunks of one call for the Triton kernels, all int64 (token offsets of long packed batches do not
    fit int32 once multiplied by heads and dims): every call is variable-length, a [B, T] batch being B
    sequences of T tokens over the flattened token axis, so one set of kernels serves both.
      cu_seqlens    [N+1]            the sequences' bounds in the flattened token axis
      chunk_indices [num_chunks, 2]  (sequence, chunk within the sequence) of every chunk, sequence-major
      chunk_offsets [N+1]            each sequence's first chunk (where its states are stored), and the total
    Built on the host from the bounds: without cu_seqlens from (B, T) alone, with cu_seqlens on a GPU by one
    copy to the host. The op's forward builds it once and its backward reuses it."""

    def __init__(self, cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device | str):
        bounds = torch.tensor(sequence_bounds(cu_seqlens, batch, seq_len), dtype=torch.long)
        lengths = bounds[1:] - bounds[:-1]
        chunks = (lengths + CHUNK_SIZE - 1) // CHUNK_SIZE
        offsets = torch.cat([chunks.new_zeros(1), torch.cumsum(chunks, 0)])
        sequence = torch.repeat_interleave(torch.arange(len(chunks)), chunks)
        within = torch.arange(len(sequence)) - offsets[sequence]
        self.num_sequences, self.num_chunks = len(chunks), len(sequence)
        self.cu_seqlens = bounds.to(device)
        self.chunk_indices = torch.stack([sequence, within], 1).contiguous().to(device)
        self.chunk_offsets = offsets.to(device)
