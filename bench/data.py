"""Data throughput: prepare (tokens/s, all workers) and the packed loader (tokens/s, one process).

    python -m bench.data                       # the embedded corpus, prepared fresh in a temp dir
    python -m bench.data --seq-len 4096 --micro-batch 4 --batches 300
"""
import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from data import DataConfig, PackedLoader, stdlib_prepare_config
from data.prepare import prepare_shards
from data.shards import (MANIFEST, SPLITS, build_manifest, read_manifest, shard_name, token_dtype, write_json,
                         write_shard)


def bench_prepare(out_dir: Path, workers: int) -> Path:
    """Prepare the embedded corpus twice: training its tokenizer, then with that tokenizer (tokenizing only)."""
    cfg = stdlib_prepare_config(DataConfig(cache_dir=str(out_dir), workers=workers))
    reuse = dataclasses.replace(cfg, out=str(out_dir / "tokenize_only"), tokenizer=dataclasses.replace(
        cfg.tokenizer, path=str(Path(cfg.out) / "tokenizer.model")))
    for what, settings in (("tokenizer training included", cfg), ("tokenizing only", reuse)):
        started = time.perf_counter()
        out = prepare_shards(settings, progress=False)
        seconds = time.perf_counter() - started
        tokens = sum(s["num_tokens"] for s in read_manifest(out)["splits"].values())
        print(f"prepare (stdlib, {workers or os.cpu_count()} workers, {what}): {tokens:,} tokens in {seconds:.1f}s "
              f"= {tokens / seconds / 1e6:.2f}M tokens/s")
    return out


def short_document_set(root: Path, n_docs: int = 200_000, mean_len: int = 200) -> Path:
    """Many short documents: the loader's worst case (most pieces per row)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 8000, n) for n in rng.geometric(1 / mean_len, n_docs)]
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    per_shard = n_docs // 4
    for i in range(4):
        chunk = docs[i * per_shard:(i + 1) * per_shard]
        write_shard(root / "train" / shard_name(i), chunk, [len(d) for d in chunk], token_dtype(8192), "x" * 64)
        write_shard(root / "held_out" / shard_name(i), [], [], token_dtype(8192), "x" * 64)
    write_json(root / MANIFEST, build_manifest(root, 4, "x" * 64, 8192, 2, {}))
    return root


def bench_loader(name: str, train_dir: Path, seq_len: int, micro_batch: int, batches: int) -> None:
    loader = PackedLoader(train_dir, seq_len, micro_batch, micro_batch * 2, dp_rank=1, dp_size=2, seed=0)
    next(loader)  # the first epoch's order
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - started
    tokens = batches * micro_batch * seq_len
    print(f"loader ({name}, seq_len {seq_len}, micro batch {micro_batch}): {tokens / seconds / 1e6:.2f}M tokens/s "
          f"per process ({seconds / batches * 1e3:.2f} ms/batch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=0, help="prepare worker processes (0: all cores)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = bench_prepare(Path(tmp), args.workers)
        bench_loader("stdlib", out / "train", args.seq_len, args.micro_batch, args.batches)
        short = short_document_set(Path(tmp) / "short")
        bench_loader("200-token documents", short / "train", args.seq_len, args.micro_batch, args.batches)


if __name__ == "__main__":
    main()
