"""Data throughput: prepare (tokens/s, all workers) and the packed loader (tokens/s, one process).

    python -m bench.data                       # the embedded corpus, prepared fresh in a temp dir
    python -m bench.data --seq-len 4096 --micro-batch 4 --batches 300
    python -m bench.data --synthetic 500000,8000000   # loader memory and start-up against corpus size

--synthetic writes N documents of random length (1-64 tokens) with the real shard writer, builds the
loader for data-parallel rank 0 of 8 in a fresh process per size, reads 20 batches and reports the
growth of that process's resident memory (VmRSS, after imports), its start-up time and tokens/s;
the figures are saved as JSON under bench/results/.
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_results
from data import DataConfig, PackedLoader, stdlib_prepare_config
from data.prepare import prepare_shards
from data.shards import (MANIFEST, SPLITS, build_manifest, read_manifest, shard_name, token_dtype, write_json,
                         write_shard)
from training.metrics import process_memory_bytes


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


def synthetic_set(root: Path, lengths: np.ndarray, docs_per_shard: int, seed: int = 0) -> Path:
    """Documents of the given lengths (random token ids), docs_per_shard per shard, written as prepare writes them."""
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(lengths) // docs_per_shard)
    for i in range(n_shards):
        shard_lengths = lengths[i * docs_per_shard:(i + 1) * docs_per_shard]
        tokens = rng.integers(10, 8000, int(shard_lengths.sum()), dtype=np.uint16)
        docs = np.split(tokens, np.cumsum(shard_lengths)[:-1])
        write_shard(root / "train" / shard_name(i), docs, (4 * shard_lengths).tolist(), token_dtype(8192), "x" * 64)
        write_shard(root / "held_out" / shard_name(i), [], [], token_dtype(8192), "x" * 64)
    write_json(root / MANIFEST, build_manifest(root, n_shards, "x" * 64, 8192, 2, {}))
    return root


def measure_loader(train_dir: Path, seq_len: int, micro_batch: int, batches: int, dp_size: int = 8) -> dict:
    """Build the loader of rank 0 of dp_size, read `batches` batches: resident memory growth, start-up, tokens/s."""
    before = process_memory_bytes("VmRSS")
    started = time.perf_counter()
    loader = PackedLoader(train_dir, seq_len, micro_batch, micro_batch * dp_size, dp_rank=0, dp_size=dp_size, seed=0)
    built = time.perf_counter()
    next(loader)
    first = time.perf_counter()
    for _ in range(batches - 1):
        next(loader)
    done = time.perf_counter()
    return {"rss_growth_mib": (process_memory_bytes("VmRSS") - before) / 2**20, "build_s": built - started,
            "first_batch_s": first - built, "tokens_per_s": batches * micro_batch * seq_len / (done - started),
            "steady_tokens_per_s": (batches - 1) * micro_batch * seq_len / (done - first)}


def bench_synthetic(sizes: list[int], docs_per_shard: int, seq_len: int, micro_batch: int, batches: int) -> None:
    """Per size: the loader of job rank 0 (which hashes every shard under data.verify=full) and of job rank 1
    (sizes only), each in a fresh process."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_docs in sizes:
            lengths = np.random.default_rng(n_docs).integers(1, 65, n_docs)
            root = synthetic_set(Path(tmp) / f"n{n_docs}", lengths, docs_per_shard)
            command = [sys.executable, "-m", "bench.data", "--measure-loader", str(root / "train"),
                       "--seq-len", str(seq_len), "--micro-batch", str(micro_batch), "--batches", str(batches)]
            ranks = [json.loads(subprocess.run(command, capture_output=True, text=True, check=True,
                                               env={**os.environ, "RANK": str(rank)}).stdout) for rank in (0, 1)]
            result = {"documents": n_docs, "shards": -(-n_docs // docs_per_shard),
                      "tokens": read_manifest(root)["splits"]["train"]["num_tokens"], "job_rank_0": ranks[0],
                      "job_rank_1": ranks[1]}
            results.append(result)
            print(f"{n_docs:,} documents in {result['shards']} shards: " + "; ".join(
                f"job rank {rank}: +{r['rss_growth_mib']:.1f} MiB resident, built in {r['build_s']:.2f}s, "
                f"first batch {r['first_batch_s']:.3f}s, {r['tokens_per_s'] / 1e6:.2f}M tokens/s over {batches} "
                f"batches ({r['steady_tokens_per_s'] / 1e6:.2f}M after the first)" for rank, r in enumerate(ranks)))
            shutil.rmtree(root)
    write_results("data_synthetic", {"seq_len": seq_len, "micro_batch": micro_batch, "dp_size": 8, "batches": batches,
                                     "docs_per_shard": docs_per_shard, "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=0, help="prepare worker processes (0: all cores)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, help="batches read (default 200; --synthetic: 20)")
    parser.add_argument("--synthetic", help="comma-separated document counts: the loader-memory benchmark")
    parser.add_argument("--docs-per-shard", type=int, default=100_000,
                        help="--synthetic: documents per shard (100M-token shards of ~1000-token documents: 100k)")
    parser.add_argument("--measure-loader", help=argparse.SUPPRESS)  # the fresh process of one --synthetic size
    args = parser.parse_args()
    if args.batches is None:
        args.batches = 20 if args.synthetic or args.measure_loader else 200
    if args.measure_loader:
        print(json.dumps(measure_loader(Path(args.measure_loader), args.seq_len, args.micro_batch, args.batches)))
        return
    if args.synthetic:
        sizes = [int(n) for n in args.synthetic.split(",")]
        bench_synthetic(sizes, args.docs_per_shard, args.seq_len, args.micro_batch, args.batches)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = bench_prepare(Path(tmp), args.workers)
        bench_loader("stdlib", out / "train", args.seq_len, args.micro_batch, args.batches)
        lengths = np.random.default_rng(0).geometric(1 / 200, 200_000)  # the loader's worst case: most pieces per row
        short = synthetic_set(Path(tmp) / "short", lengths, 50_000)
        bench_loader("200-token documents", short / "train", args.seq_len, args.micro_batch, args.batches)


if __name__ == "__main__":
    main()
