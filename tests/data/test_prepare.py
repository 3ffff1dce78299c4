"""python -m data.prepare: every source format, shards and manifest, held-out split, parallel, resumable, idempotent."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.prepare import PrepareConfig, main, prepare_shards, tokenize_chunk
from data.shards import MANIFEST, Shard, ShardSet, read_manifest
from data.tokenizer import Tokenizer, TokenizerConfig
from shard_fixtures import corpus, write_text_files

ROOT = Path(__file__).resolve().parents[2]


def config(source, out, **overrides) -> PrepareConfig:
    settings = dict(source=str(source), out=str(out), held_out_fraction=0.2, shard_size_tokens=3000, workers=1,
                    tokenizer=TokenizerConfig(vocab_size=400))
    return PrepareConfig(**{**settings, **overrides})


def decoded_documents(out: Path, split: str) -> list[str]:
    tokenizer = Tokenizer(out / "tokenizer.model")
    return [tokenizer.decode(tokens.tolist()) for tokens, _ in ShardSet(out / split, tokenizer.hash).documents()]


def shard_checksums(out: Path) -> dict:
    return {split: [s["checksum"] for s in v["shards"]] for split, v in read_manifest(out)["splits"].items()}


@pytest.fixture(scope="module")
def docs():
    return corpus(80, seed=3)


@pytest.fixture(scope="module")
def reference(docs, tmp_path_factory):
    """The docs prepared from a directory of text files: what every other source must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    return prepare_shards(config(write_text_files(tmp / "text", docs), tmp / "out"), progress=False)


def test_text_directory_to_shards_manifest_and_held_out_split(reference, docs):
    manifest = read_manifest(reference)
    train, held_out = decoded_documents(reference, "train"), decoded_documents(reference, "held_out")
    assert Counter(train + held_out) == Counter(docs)  # every document exactly once, byte for byte
    assert 0.05 < len(held_out) / len(docs) < 0.4 and not set(train) & set(held_out)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 4 and all(s["num_tokens"] < 2 * 3000 for s in shards)  # ~shard_size_tokens each
    tokenizer = Tokenizer(reference / "tokenizer.model")
    assert manifest["tokenizer_hash"] == tokenizer.hash
    for split in ("train", "held_out"):
        shard_set = ShardSet(reference / split, tokenizer.hash)
        assert shard_set.num_tokens == manifest["splits"][split]["num_tokens"]
        assert all(shard.index.tokenizer_hash == tokenizer.hash and shard.tokens().dtype == np.uint16
                   for shard in shard_set.shards)
        by_text = {doc.encode(): doc for doc in docs}
        for (tokens, n_bytes), text in zip(shard_set.documents(), decoded_documents(reference, split)):
            assert n_bytes == len(text.encode()) and text.encode() in by_text
    assert not list(reference.rglob("*.tmp-*")) and not (reference / "prepare.json").exists()


def test_every_source_format_gives_the_same_shards(reference, docs, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    records = [{"id": i, "body": doc} for i, doc in enumerate(docs)]
    (tmp_path / "jsonl").mkdir()
    for part in range(2):  # two files, read in sorted order
        with open(tmp_path / "jsonl" / f"part_{part}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records[part * 40:(part + 1) * 40])
    (tmp_path / "data.json").write_text(json.dumps(records))
    pq.write_table(pa.table({"body": docs}), tmp_path / "data.parquet", row_group_size=16)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    sources = {
        "text glob": dict(source=str(reference.parent / "text" / "doc_*.txt")),
        "jsonl dir": dict(source=str(tmp_path / "jsonl")),
        "json": dict(source=str(tmp_path / "data.json")),
        "parquet": dict(source=str(tmp_path / "data.parquet")),
        "hf local path": dict(source=str(tmp_path / "jsonl"), format="hf"),
        "hf streaming": dict(source=str(tmp_path / "jsonl"), format="hf", streaming=True),
        "hf save_to_disk streaming": dict(source=str(tmp_path / "saved"), streaming=True),
    }
    expected = shard_checksums(reference)
    for name, source in sources.items():
        out = prepare_shards(config(out=tmp_path / name.replace(" ", "_"), **{"field": "body", **source}),
                             progress=False)
        assert shard_checksums(out) == expected, name


def test_large_vocabulary_uses_uint32(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(70_000)]
    docs = [" ".join(words[i:i + 50]) for i in range(0, len(words), 50)] * 2
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = prepare_shards(config(tmp_path / "big.jsonl", tmp_path / "out", shard_size_tokens=10**6,
                                held_out_fraction=0.01, tokenizer=TokenizerConfig(vocab_size=66_000)), progress=False)
    manifest = read_manifest(out)
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 66_000
    shards = ShardSet(out / "train")
    assert shards.shards[0].tokens().dtype == np.uint32
    assert max(int(s.tokens().max()) for s in shards.shards) >= 2**16  # ids that do not fit uint16 are kept
    assert Counter(decoded_documents(out, "train") + decoded_documents(out, "held_out")) == Counter(docs)


def test_workers_give_the_same_output_and_an_existing_tokenizer_can_be_reused(reference, tmp_path):
    text = reference.parent / "text"
    out = prepare_shards(config(text, tmp_path / "parallel", workers=2), progress=False)
    assert shard_checksums(out) == shard_checksums(reference)
    reused = prepare_shards(config(text, tmp_path / "reused", tokenizer=TokenizerConfig(
        path=str(reference / "tokenizer.model"), vocab_size=400)), progress=False)
    assert shard_checksums(reused) == shard_checksums(reference)


def test_rerun_on_finished_output_does_nothing(reference, tmp_path):
    text = write_text_files(tmp_path / "text", corpus(10, seed=5))
    out = prepare_shards(config(text, tmp_path / "out"), progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for p in text.iterdir():  # not even the source is read again
        p.unlink()
    assert main([f"source={text}", f"out={out}", "held_out_fraction=0.2", "shard_size_tokens=3000", "workers=1",
                 "tokenizer.vocab_size=400"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_interrupted_prepare_continues_and_keeps_finished_shards(reference, tmp_path, monkeypatch):
    text = reference.parent / "text"
    calls = []

    def fail_on_third_chunk(i, *args):
        calls.append(i)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return tokenize_chunk(i, *args)

    monkeypatch.setattr("data.prepare.tokenize_chunk", fail_on_third_chunk)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(config(text, out), progress=False)
    assert not (out / MANIFEST).exists() and (out / "prepare.json").exists()
    done = sorted(out.glob("train/shard_*.idx"))
    assert len(done) == 2
    stamps = {p: p.stat().st_mtime_ns for p in done}
    (out / "train" / ".shard_00002.bin.tmp-999").write_bytes(b"half a shard")  # what a kill mid-write leaves
    calls.clear()
    monkeypatch.undo()
    prepare_shards(config(text, out), progress=False)
    assert shard_checksums(out) == shard_checksums(reference)
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # finished shards were not redone
    assert not list(out.rglob("*.tmp-*")) and not (out / "prepare.json").exists()


def test_killed_prepare_leaves_only_complete_files_and_resumes(tmp_path):
    docs = corpus(400, seed=7, words_per_doc=400)
    text = write_text_files(tmp_path / "text", docs)
    args = [f"source={text}", "held_out_fraction=0.1", "shard_size_tokens=4000", "workers=1",
            "tokenizer.vocab_size=400"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "data.prepare", f"out={out}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # generous: the machine may be busy; the loop ends as soon as 3 shards exist
    while len(list(out.glob("train/shard_*.idx"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists(), "the prepare finished before it could be killed"
    for idx in out.glob("*/shard_*.idx"):  # everything under a final name is complete and consistent
        Shard(idx.with_suffix(""))
    assert main([f"out={out}", *args]) == 0
    assert main([f"out={tmp_path / 'fresh'}", *args]) == 0
    assert shard_checksums(out) == shard_checksums(tmp_path / "fresh")
    assert Counter(decoded_documents(out, "train") + decoded_documents(out, "held_out")) == Counter(docs)
