"""Shared fixtures for the data tests: synthetic prepared datasets (no tokenizer needed) and small corpora."""
from pathlib import Path

import numpy as np
import pytest

from data.shards import MANIFEST, SPLITS, build_manifest, shard_name, token_dtype, write_json, write_shard

EOS = 2


def synthetic_docs(n: int, seed: int, low: int = 10, high: int = 1000, max_len: int = 40) -> list[np.ndarray]:
    """n documents of random length 1..max_len; token ids in [low, high), never EOS."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, rng.integers(1, max_len + 1)).astype(np.int64) for _ in range(n)]


def make_prepared(root: Path, train_shards: list[list[np.ndarray]], held_out: list[np.ndarray] = (),
                  vocab_size: int = 1000, tokenizer_hash: str = "a" * 64) -> Path:
    """A prepared dataset directory laid out exactly as data.prepare writes it, from token lists."""
    dtype = token_dtype(vocab_size)
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(train_shards):
        write_shard(root / "train" / shard_name(i), docs, [4 * len(d) for d in docs], dtype, tokenizer_hash)
        write_shard(root / "held_out" / shard_name(i), list(held_out) if i == 0 else [],
                    [4 * len(d) for d in held_out] if i == 0 else [], dtype, tokenizer_hash)
    write_json(root / MANIFEST, build_manifest(root, len(train_shards), tokenizer_hash, vocab_size, EOS, {}))
    return root


@pytest.fixture
def small_dataset(tmp_path) -> tuple[Path, list[np.ndarray]]:
    """Three shards of synthetic documents; returns (train dir, all train documents)."""
    shards = [synthetic_docs(30, seed) for seed in range(3)]
    root = make_prepared(tmp_path / "small", shards, held_out=synthetic_docs(5, 99))
    return root / "train", [d for shard in shards for d in shard]


WORDS = ("the state of a recurrent layer is a matrix per head def return import class for while if else "
         "token shard loader packed document naïve café Straße 東京 データ 🚀 λ x = y + 1 \t").split(" ")


def corpus(n_docs: int, seed: int = 0, words_per_doc: int = 200) -> list[str]:
    """Documents of words, numbers, unicode, indentation and newlines (what the tokenizer must keep exactly)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 10):
            words = rng.choice(WORDS, 10).tolist() + [str(rng.integers(0, 10**6))]
            lines.append("    " * int(rng.integers(0, 3)) + " ".join(words))
        docs.append(f"# document {i}\n" + "\n".join(lines) + "\n")
    return docs


def write_text_files(directory: Path, docs: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc_{i:04d}.txt").write_text(doc, encoding="utf-8")
    return directory
