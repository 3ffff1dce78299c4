"""The packed, seeded, resumable training loader.

The global row stream is a pure function of (seed, global row index):
- per dataset and epoch, a seeded order of the shards, and inside each shard a seeded order of its
  documents, made when the stream reaches that shard (seeded by epoch and shard alone);
- the documents in that order are laid out as `EOS doc EOS doc ...`; row q of the epoch is tokens
  [q*L, q*L + L + 1) of that layout (L = seq_len; consecutive rows share one token, so every token is
  a label once); per-shard token totals find the shard holding a token, prefix sums of that shard's
  document lengths (in its epoch order) the document;
- with several datasets, every block of MIX_BLOCK global rows holds each dataset's share (by weight)
  of rows, in a seeded order.
What a rank holds grows with the shards, not the documents: per-shard totals and the orders of the few
shards being read (OPEN_SHARDS); token ids and document offsets are read by memory map.
Micro-step j of optimizer step s on data-parallel rank d reads global rows
s*G + j*(D*m) + d*m + [0, m) (G global batch, D ranks, m micro batch), so the rows of a step do not
depend on D. The whole state is the count of rows consumed: resuming at another D continues the
same stream, nothing repeated or skipped.
"""
import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from data.shards import ShardSet
from kernels.common import attach_host_bounds

MIX_BLOCK = 4096
OPEN_SHARDS = 4  # shard orders (and memory maps) kept per dataset: a batch, and one epoch's end and the next's start
STATE_VERSION = 2  # 1: one document order over all shards per epoch
Sources = Union[str, os.PathLike, Sequence[Union[str, os.PathLike, tuple]]]


class PackedRows:
    """One dataset's packed row stream over all epochs, by random access."""

    def __init__(self, shards: ShardSet, seq_len: int, eos_id: int, seed: int):
        self.shards, self.seq_len, self.eos_id, self.seed = shards.shards, seq_len, eos_id, seed
        # Tokens of each shard's part of an epoch's layout: its documents, one EOS before each.
        self.layout_tokens = np.array([s.index.num_tokens + s.index.num_documents for s in self.shards], np.int64)
        layout_len = int(self.layout_tokens.sum())
        self.rows_per_epoch = (layout_len - 1) // seq_len
        if self.rows_per_epoch < 1:
            raise ValueError(f"{shards.dir}: {layout_len} tokens are fewer than one row of seq_len + 1 = {seq_len + 1}")
        self.epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.open: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, end of each shard's part of the layout) of one epoch: O(shards)."""
        if epoch not in self.epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            self.epochs = {e: v for e, v in self.epochs.items() if e >= epoch - 1}  # a batch spans at most 2
            self.epochs[epoch] = order, np.cumsum(self.layout_tokens[order])
        return self.epochs[epoch]

    def shard_layout(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start in the .bin of each document in its epoch order, start of its `EOS doc` segment in the shard's
        part of the layout, the shard's tokens): O(documents of one shard), kept for OPEN_SHARDS shards."""
        key = (epoch, shard)
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key]
        index = self.shards[shard].index
        lengths = index.document_lengths()
        order = np.random.default_rng([self.seed, epoch, shard]).permutation(len(lengths))
        segment_start = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[order][:-1] + 1, out=segment_start[1:])
        self.open[key] = (np.asarray(index.arrays()[0][:-1][order]), segment_start,
                          np.asarray(self.shards[shard].tokens()))  # a plain view of the map: faster to index
        if len(self.open) > OPEN_SHARDS:
            self.open.popitem(last=False)
        return self.open[key]

    def row(self, index: int) -> tuple[np.ndarray, list[int]]:
        """Tokens [L + 1] of row `index` and the positions in it where a document's segment (its EOS) starts."""
        epoch = index // self.rows_per_epoch
        start = (index % self.rows_per_epoch) * self.seq_len
        order, shard_end = self.epoch(epoch)
        p = int(np.searchsorted(shard_end, start, side="right"))  # the shard holding token `start`
        out = np.full(self.seq_len + 1, self.eos_id, np.int64)
        starts = []
        pos = start  # the layout position up to which `out` is filled
        while pos < start + len(out):
            shard = int(order[p])
            stop = min(start + len(out), int(shard_end[p]))
            doc_start, segment_start, tokens = self.shard_layout(epoch, shard)
            shard_start = int(shard_end[p]) - int(self.layout_tokens[shard])
            lo, hi = pos - shard_start, stop - shard_start  # this piece of the row, in the shard's part
            first, last = np.searchsorted(segment_start, [lo, hi - 1], side="right") - 1  # its segments
            begin = segment_start[first:last + 1]
            counts = np.diff(np.concatenate([[lo], begin[1:], [hi]]))  # tokens of each segment in [lo, hi)
            # Layout position x of segment k holds its EOS at x == begin[k], else token x - begin[k] - 1 of it.
            source = np.arange(lo, hi) + np.repeat(doc_start[first:last + 1] - begin - 1, counts)
            eos = begin[begin >= lo] - lo
            is_token = np.ones(hi - lo, bool)
            is_token[eos] = False
            out[pos - start:stop - start][is_token] = tokens[source[is_token]]
            starts.extend((pos - start + eos).tolist())
            pos, p = stop, p + 1
        return out, starts


def normalize_sources(sources: Sources) -> list[tuple[Path, float]]:
    """A directory, a list of directories (equal weights) or a list of (directory, weight)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    pairs = [(Path(s[0]), float(s[1])) if isinstance(s, tuple) else (Path(s), 1.0) for s in sources]
    if not pairs:
        raise ValueError("no training data given")
    for path, weight in pairs:
        if not weight > 0:
            raise ValueError(f"{path}: mixture weight must be > 0, got {weight}")
    return pairs


def block_counts(weights: list[float]) -> np.ndarray:
    """Rows per MIX_BLOCK of each dataset: its share, rounded by largest remainder so they sum to the block."""
    share = np.asarray(weights) / sum(weights) * MIX_BLOCK
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[:MIX_BLOCK - counts.sum()]] += 1
    return counts


class PackedLoader:
    """Infinite iterator of this rank's micro-batches (the batch dict of COMMON.md's batch format)."""

    def __init__(self, sources: Sources, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, sp_rank: int = 0, sp_size: int = 1, seed: int = 0,
                 tokenizer_hash: Optional[str] = None, verify: str = "full"):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch x data-parallel "
                             f"ranks = {micro_batch_size} x {dp_size}")
        if seq_len % sp_size:
            raise ValueError(f"seq_len {seq_len} is not divisible by the sequence-parallel size {sp_size}")
        if not (0 <= dp_rank < dp_size and 0 <= sp_rank < sp_size):
            raise ValueError(f"rank out of range: dp {dp_rank}/{dp_size}, sp {sp_rank}/{sp_size}")
        self.seq_len, self.micro_batch_size, self.global_batch_size = seq_len, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        pairs = normalize_sources(sources)
        sets = [ShardSet(path, tokenizer_hash, verify) for path, _ in pairs]
        eos_ids = {s.eos_id for s in sets}
        hashes = {s.tokenizer_hash for s in sets}
        if len(hashes) > 1 or len(eos_ids) > 1:
            raise ValueError(f"mixture datasets were prepared with different tokenizers: {[str(p) for p, _ in pairs]}")
        self.eos_id = eos_ids.pop()
        self.weights = [w for _, w in pairs]
        self.counts = block_counts(self.weights)
        if np.any(self.counts == 0):
            raise ValueError(f"mixture weights {self.weights}: a weight below 1/{MIX_BLOCK} of the total gets no rows")
        self.sets = sets
        self.fingerprint = hashlib.sha256(repr([(s.fingerprint, w) for s, w in zip(sets, self.weights)]).encode()
                                          ).hexdigest()
        self.rows_consumed = 0
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        self.seed = seed
        self.datasets = [PackedRows(s, self.seq_len, self.eos_id, seed=hash_seed(seed, k))
                         for k, s in enumerate(self.sets)]
        self.block = None  # (block index, dataset of each row, its rank among that dataset's rows in the block)

    def mixture_row(self, row: int) -> tuple[int, int]:
        """(dataset, row index in that dataset's own stream) of a global row."""
        block, pos = divmod(row, MIX_BLOCK)
        if self.block is None or self.block[0] != block:
            rng = np.random.default_rng([self.seed, block, len(self.counts)])
            dataset = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            rank = np.empty(MIX_BLOCK, np.int64)
            for k, count in enumerate(self.counts):
                rank[dataset == k] = np.arange(count)
            self.block = block, dataset, rank
        k = int(self.block[1][pos])
        return k, block * int(self.counts[k]) + int(self.block[2][pos])

    def global_row(self, row: int) -> tuple[np.ndarray, list[int]]:
        k, index = self.mixture_row(row)
        return self.datasets[k].row(index)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        m, local = self.micro_batch_size, self.seq_len // self.sp_size
        first = self.rows_consumed + self.dp_rank * m
        self.rows_consumed += self.dp_size * m
        lo = self.sp_rank * local  # this sequence-parallel rank's slice of every row
        tokens = np.empty((m, self.seq_len + 1), np.int64)
        cu_seqlens, starts_document = [], []
        for b in range(m):
            tokens[b], starts = self.global_row(first + b)
            cu_seqlens.append(b * local)
            cu_seqlens.extend(b * local + p - lo for p in starts if lo < p < lo + local)
            starts_document.append(self.sp_rank == 0 or lo in starts)
        cu_seqlens.append(m * local)
        tokens = torch.from_numpy(tokens)
        return {"input_ids": tokens[:, lo:lo + local].contiguous(),
                "labels": tokens[:, lo + 1:lo + 1 + local].contiguous(),
                "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
                "starts_document": torch.tensor(starts_document, dtype=torch.bool)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rows_consumed": self.rows_consumed, "seed": self.seed,
                "seq_len": self.seq_len, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: version {state.get('version')}, expected {STATE_VERSION}")
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"loader state: saved with seq_len {state['seq_len']}, this run has {self.seq_len}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("loader state: saved on other training data (shards or mixture weights differ)")
        if state["rows_consumed"] % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"loader state: {state['rows_consumed']} rows consumed is not a whole number of "
                             f"micro-steps of {self.micro_batch_size} x {self.dp_size} rows (save at a step boundary)")
        if state["seed"] != self.seed:
            self.set_seed(state["seed"])
        self.rows_consumed = state["rows_consumed"]


def hash_seed(seed: int, dataset: int) -> int:
    """Each dataset of a mixture gets its own shuffle seed."""
    return int(np.random.SeedSequence([seed, dataset]).generate_state(1)[0])


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch on the device. cu_seqlens keeps its bounds as read on the host
    (kernels.common.attach_host_bounds), so no layer has to read them back from the device."""
    on_device = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
    if "cu_seqlens" in batch:
        attach_host_bounds(on_device["cu_seqlens"], batch["cu_seqlens"])
    return on_device
