"""prepare_dataset: the embedded default corpus, prepared shards and mixtures, concurrent ranks."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from data import DataConfig, PackedLoader, prepare_dataset
from data.prepare import PrepareConfig, prepare_shards
from data.shards import read_manifest
from data.stdlib import stdlib_files
from data.tokenizer import TokenizerConfig
from shard_fixtures import corpus, write_text_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # prepares the whole embedded corpus (30 MB, a tokenizer trained on it)
def test_default_corpus_is_this_pythons_stdlib_split_by_file(tmp_path):
    ds = prepare_dataset(DataConfig(cache_dir=str(tmp_path)), progress=False)
    assert ds.tokenizer.vocab_size == 8192 and ds.train_dir.name == "train" and ds.train_dir.parent.parent == tmp_path
    texts = {path.read_bytes().decode(): path for path in stdlib_files()}  # a few files are identical
    n_files = sum(1 for path in stdlib_files() if path.stat().st_size)
    held_out = [(ds.tokenizer.decode(tokens.tolist()), n_bytes) for tokens, n_bytes in ds.held_out_documents()]
    assert all(text in texts and n_bytes == texts[text].stat().st_size for text, n_bytes in held_out)
    manifest = read_manifest(ds.train_dir.parent)
    n_docs = {split: manifest["splits"][split]["num_documents"] for split in ("train", "held_out")}
    assert n_docs["train"] + n_docs["held_out"] == n_files
    assert 0.01 < n_docs["held_out"] / len(texts) < 0.04 and len(manifest["splits"]["train"]["shards"]) > 4
    batch = next(PackedLoader(ds.train_dir, 256, 2, 2, tokenizer_hash=ds.tokenizer.hash))
    assert ds.tokenizer.decode(batch["input_ids"][0, 1:].tolist()) in "".join(texts)
    written = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    assert prepare_dataset(DataConfig(cache_dir=str(tmp_path)), progress=False).tokenizer.hash == ds.tokenizer.hash
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()} == written  # cached


def test_ranks_preparing_at_once_get_one_complete_dataset(tmp_path):
    text = write_text_files(tmp_path / "text", corpus(60, seed=4))
    args = [f"source={text}", f"out={tmp_path / 'out'}", "shard_size_tokens=2000", "workers=1",
            "tokenizer.vocab_size=400"]
    command = [sys.executable, "-c", "import sys; from data.prepare import main; sys.exit(main(sys.argv[1:]))", *args]
    ranks = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(rank.wait() == 0 for rank in ranks)
    reference = prepare_shards(PrepareConfig(source=str(text), out=str(tmp_path / "reference"), shard_size_tokens=2000,
                                             workers=1, tokenizer=TokenizerConfig(vocab_size=400)), progress=False)
    assert read_manifest(tmp_path / "out")["splits"] == read_manifest(reference)["splits"]


def test_prepared_shards_and_mixtures(tmp_path):
    roots = []
    for name, seed in (("a", 1), ("b", 2)):
        text = write_text_files(tmp_path / f"text_{name}", corpus(30, seed=seed))
        tokenizer = TokenizerConfig(path=str(roots[0] / "tokenizer.model")) if roots else TokenizerConfig(vocab_size=400)
        roots.append(prepare_shards(PrepareConfig(source=str(text), out=str(tmp_path / name), held_out_fraction=0.3,
                                                  workers=1, tokenizer=tokenizer), progress=False))
    single = prepare_dataset(DataConfig(source="shards", path=str(roots[0])))
    assert single.train_sources == [(roots[0] / "train", 1.0)] and single.held_out_dir == roots[0] / "held_out"
    mixed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "source": "shards",
        "mixture": [{"path": str(roots[0]), "weight": 2.0}, {"path": str(roots[1]), "weight": 1.0}]}))
    ds = prepare_dataset(mixed)
    assert ds.train_sources == [(roots[0] / "train", 2.0), (roots[1] / "train", 1.0)]
    held_out = list(ds.held_out_documents())
    assert len(held_out) == sum(read_manifest(r)["splits"]["held_out"]["num_documents"] for r in roots)
    assert all(isinstance(tokens, np.ndarray) and tokens.dtype == np.int64 for tokens, _ in held_out)
    loader = PackedLoader(ds.train_sources, 32, 4, 4, tokenizer_hash=ds.tokenizer.hash)
    assert next(loader)["input_ids"].shape == (4, 32)
