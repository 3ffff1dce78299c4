"""Chunks of packed sequences: CHUNK_SIZE (the one definition), the sequence bounds, the PyTorch paths'
chunked layout and the Triton kernels' chunk index.

The bounds of a batch's cu_seqlens are read to the host once per batch, not once per layer: they are kept on
the tensor itself (with its version, so an in-place change is seen), as is the chunk index built from them.
The training loop attaches them while the batch is still on the host (`attach_host_bounds`), so on a GPU
no layer waits for the device to answer what the loader already knew.

Sequences (the rows of a batch, or the documents of cu_seqlens) are cut into chunks that start at each
sequence's own first token, so a chunk never spans two sequences. The PyTorch paths gather the tokens into a
[num_chunks, chunk_size] layout (the tail of each sequence's last chunk is zero) and run the state scan over
a [num_seqs, max_chunks] grid; the Triton kernels get the same chunks as a list of (sequence, chunk) pairs.
"""
import functools
import itertools
from dataclasses import dataclass

import torch

CHUNK_SIZE = 64  # tokens per chunk of every chunkwise op (and of their FLOP count, model/flops.py)


def sequence_bounds(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[int]:
    """Offsets of the sequences in the flattened [B*T] token axis: the rows, or cu_seqlens."""
    if cu_seqlens is None:
        return [b * seq_len for b in range(batch + 1)]
    known = getattr(cu_seqlens, "_host_bounds", None)
    if known is not None and known[0] == cu_seqlens._version:
        bounds = known[1]
    else:
        bounds = cu_seqlens.tolist()
        cu_seqlens._host_bounds = (cu_seqlens._version, bounds)
    if bounds[0] != 0 or bounds[-1] != batch * seq_len or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {batch * seq_len}, got {bounds}")
    return bounds


def attach_host_bounds(cu_seqlens: torch.Tensor, host_cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (on the device) knowing its bounds from host_cu_seqlens, the same values on the host."""
    cu_seqlens._host_bounds = (cu_seqlens._version, host_cu_seqlens.tolist())
    return cu_seqlens


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


def chunk_index(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> "ChunkIndex":
    """The ChunkIndex of a call, built once per batch (kept on cu_seqlens) or per (batch, seq_len, device)."""
    if cu_seqlens is None:
        return _fixed_chunk_index(batch, seq_len, torch.device(device))
    known = getattr(cu_seqlens, "_chunk_index", None)
    if known is None or known[0] != cu_seqlens._version or known[1] != (batch, seq_len):
        known = (cu_seqlens._version, (batch, seq_len), ChunkIndex(cu_seqlens, batch, seq_len, device))
        cu_seqlens._chunk_index = known
    return known[2]


@functools.lru_cache(maxsize=64)
def _fixed_chunk_index(batch: int, seq_len: int, device: torch.device) -> "ChunkIndex":
    return ChunkIndex(None, batch, seq_len, device)


class ChunkIndex:
    """The chunks of one call for the Triton kernels, all int64 (token offsets of long packed batches do not
    fit int32 once multiplied by heads and dims): every call is variable-length, a [B, T] batch being B
    sequences of T tokens over the flattened token axis, so one set of kernels serves both.
      cu_seqlens    [N+1]            the sequences' bounds in the flattened token axis
      chunk_indices [num_chunks, 2]  (sequence, chunk within the sequence) of every chunk, sequence-major
      chunk_offsets [N+1]            each sequence's first chunk (where its states are stored), and the total
    Built on the host from the bounds (sequence_bounds: no device sync once the bounds are known) and copied
    to the device from pinned memory without waiting; `chunk_index` builds it once per batch."""

    def __init__(self, cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device | str):
        bounds = sequence_bounds(cu_seqlens, batch, seq_len)
        chunks = [(end - start + CHUNK_SIZE - 1) // CHUNK_SIZE for start, end in zip(bounds, bounds[1:])]
        pairs = [(sequence, within) for sequence, count in enumerate(chunks) for within in range(count)]
        self.num_sequences, self.num_chunks = len(chunks), len(pairs)
        self.cu_seqlens = _to_device(torch.tensor(bounds, dtype=torch.long), device)
        self.chunk_indices = _to_device(torch.tensor(pairs, dtype=torch.long).view(-1, 2), device)
        self.chunk_offsets = _to_device(torch.tensor([0, *itertools.accumulate(chunks)], dtype=torch.long), device)


def _to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on the device; to a GPU from pinned memory, so the copy does not block the host."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
