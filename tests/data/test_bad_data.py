"""Bad input: one clear error naming the file and the problem, non-zero exit, nothing prepared destroyed."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataConfig, PackedLoader, prepare_dataset
from data.prepare import PrepareConfig, main, prepare_shards
from data.shards import FORMAT_VERSION, MANIFEST, ShardSet, read_index, write_index
from data.tokenizer import TokenizerConfig
from shard_fixtures import corpus, write_text_files

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["held_out_fraction=0.2", "shard_size_tokens=3000", "workers=1", "tokenizer.vocab_size=400"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    text = write_text_files(tmp / "text", corpus(40, seed=11))
    return prepare_shards(PrepareConfig(source=str(text), out=str(tmp / "good"), held_out_fraction=0.2,
                                        shard_size_tokens=3000, workers=1, tokenizer=TokenizerConfig(vocab_size=400)),
                          progress=False)


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err  # one line (after any progress bar), no traceback
    return code, errors[0]


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_truncated_shard(copy):
    shard = copy / "train" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{shard}: truncated"):
        PackedLoader(copy / "train", 16, 1, 1)


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_found_by_rank_0_only(copy, monkeypatch):
    shard = copy / "train" / "shard_00000.bin"
    flip_byte(shard, 10)
    with pytest.raises(ValueError, match=f"{shard}: corrupted"):
        ShardSet(copy / "train")
    ShardSet(copy / "train", verify="sizes")  # the size still matches: only the checksum can tell
    monkeypatch.setenv("RANK", "3")  # data.verify=full hashes on the job's rank 0; the others check sizes
    ShardSet(copy / "train", verify="full")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=f"{shard}: corrupted"):
        PackedLoader(copy / "train", 16, 1, 1)
    with pytest.raises(ValueError, match="data.verify"):
        ShardSet(copy / "train", verify="everything")


def test_corrupted_index_is_found_by_its_checksum(copy):
    index = copy / "train" / "shard_00001.idx"
    flip_byte(index, index.stat().st_size - 3)  # a document's byte count: sizes and offsets still agree
    with pytest.raises(ValueError, match=f"{index}: corrupted"):
        ShardSet(copy / "train")


def rewrite_index(path: Path, doc_offsets: np.ndarray) -> None:
    header = read_index(path)
    write_index(path, doc_offsets, header.arrays()[1].copy(), header.dtype, header.tokenizer_hash, header.checksum)


def test_index_that_disagrees_with_its_shard(copy):
    index = copy / "train" / "shard_00002.idx"
    offsets = read_index(index).arrays()[0].copy()
    rewrite_index(index, offsets + np.arange(len(offsets)))  # one more token per document
    with pytest.raises(ValueError, match=f"{copy / 'train' / 'shard_00002.bin'}: truncated"):
        ShardSet(copy / "train")
    shutil.copy(copy / "train" / "shard_00000.idx", index)  # a whole other shard's index
    with pytest.raises(ValueError, match="shard_00002"):
        ShardSet(copy / "train")
    index.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{index}: unreadable shard index"):
        ShardSet(copy / "train")


def test_decreasing_offsets_are_found_when_the_shard_is_read(copy):
    index = copy / "train" / "shard_00001.idx"
    offsets = read_index(index).arrays()[0].copy()
    offsets[1:3] = offsets[2], offsets[1]  # the first and last offsets (all a size check reads) unchanged
    rewrite_index(index, offsets)
    shards = ShardSet(copy / "train", verify="sizes")
    with pytest.raises(ValueError, match=f"{index}: inconsistent shard index \\(document offsets decrease\\)"):
        list(shards.documents())
    loader = PackedLoader(copy / "train", 16, 1, 1, verify="sizes")
    with pytest.raises(ValueError, match=f"{index}: inconsistent"):
        for _ in range(loader.datasets[0].rows_per_epoch):
            next(loader)


def test_data_of_an_older_format_asks_for_a_new_prepare(copy):
    index = copy / "train" / "shard_00000.idx"
    offsets, doc_bytes = (a.copy() for a in read_index(index).arrays())
    with open(index, "wb") as f:  # format 1: an .npz
        np.savez(f, doc_offsets=offsets, doc_bytes=doc_bytes)
    with pytest.raises(ValueError, match=f"{index}: shard index of an older format \\(1\\); re-run"):
        ShardSet(copy / "train")
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=f"{copy / MANIFEST}: prepared in format 1, this version reads "
                                         f"{FORMAT_VERSION}; re-run `python -m data.prepare` into a new out="):
        PackedLoader(copy / "train", 16, 1, 1)


def test_shards_of_another_tokenizer(prepared, tmp_path):
    with pytest.raises(ValueError, match="another tokenizer"):
        PackedLoader(prepared / "train", 16, 1, 1, tokenizer_hash="0" * 64)
    other = prepare_shards(PrepareConfig(source=str(prepared.parent / "text"), out=str(tmp_path / "other"),
                                         held_out_fraction=0.2, shard_size_tokens=3000, workers=1,
                                         tokenizer=TokenizerConfig(vocab_size=450)), progress=False)
    mixture = [{"path": str(prepared), "weight": 1.0}, {"path": str(other), "weight": 1.0}]
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                              {"source": "shards", "mixture": mixture}))
    with pytest.raises(ValueError, match="different tokenizers"):
        prepare_dataset(cfg)


def test_empty_source_creates_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, f"source={tmp_path / 'empty'}", f"out={tmp_path / 'out'}", *SETTINGS)
    assert code == 1 and "no files found" in err and str(tmp_path / "empty") in err
    write_text_files(tmp_path / "blank", ["", "", ""])
    code, err = run_cli(capsys, f"source={tmp_path / 'blank'}", f"out={tmp_path / 'out'}", *SETTINGS)
    assert code == 1 and "empty source" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,content,problem", [
    ("a.jsonl", '{"text": "fine"}\n{"body": "no text"}\n', "a.jsonl:2: missing field 'text'"),
    ("b.jsonl", '{"text": "fine"}\n{"text": 3}\n', "b.jsonl:2: field 'text' is a int, expected a string"),
    ("c.jsonl", '{"text": "fine"}\n{"text": \n', "c.jsonl:2: invalid JSON"),
    ("d.json", '{"text": "not a list"}', "d.json: expected a JSON list of objects"),
    ("e.txt", b"caf\xe9 latin-1", "e.txt: not UTF-8 text"),
    ("f.parquet", None, "f.parquet: missing field 'text'"),
])
def test_bad_records_name_the_file_and_problem(tmp_path, capsys, name, content, problem):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"body": ["x"]}), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, err = run_cli(capsys, f"source={path}", f"out={tmp_path / 'out'}", *SETTINGS)
    assert code == 1 and str(tmp_path / problem) in err


def test_prepared_output_is_never_overwritten(prepared, tmp_path, capsys):
    before = snapshot(prepared)
    code, err = run_cli(capsys, f"source={prepared.parent / 'text'}", f"out={prepared}", *SETTINGS[:-1],
                        "tokenizer.vocab_size=500")
    assert code == 1 and "other settings (tokenizer differ)" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    code, err = run_cli(capsys, f"source={prepared.parent / 'text'}", f"out={tmp_path / 'mine'}", *SETTINGS)
    assert code == 1 and "is not a prepared dataset" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious" and len(list((tmp_path / "mine").iterdir())) == 2
    assert snapshot(prepared) == before


def test_interrupted_prepare_refuses_a_changed_input(tmp_path, capsys, monkeypatch):
    text = write_text_files(tmp_path / "text", corpus(30, seed=2))
    monkeypatch.setattr("data.prepare.tokenize_all", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main([f"source={text}", f"out={tmp_path / 'out'}", *SETTINGS])
    monkeypatch.undo()
    (text / "doc_0003.txt").write_text("edited")
    code, err = run_cli(capsys, f"source={text}", f"out={tmp_path / 'out'}", *SETTINGS)
    assert code == 1 and "changed since the interrupted prepare" in err


def test_interrupted_prepare_of_an_older_format_is_not_continued(tmp_path, capsys, monkeypatch):
    text = write_text_files(tmp_path / "text", corpus(30, seed=2))
    monkeypatch.setattr("data.prepare.tokenize_all", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main([f"source={text}", f"out={tmp_path / 'out'}", *SETTINGS])
    monkeypatch.undo()
    plan = json.loads((tmp_path / "out" / "prepare.json").read_text())
    del plan["format_version"]  # as format 1 wrote it: its finished shards would be .npz indexes
    (tmp_path / "out" / "prepare.json").write_text(json.dumps(plan))
    code, err = run_cli(capsys, f"source={text}", f"out={tmp_path / 'out'}", *SETTINGS)
    assert code == 1 and "an interrupted prepare of format 1" in err and "re-run" in err


def test_cli_usage_and_unknown_keys(capsys):
    code, err = run_cli(capsys, "source=x", "out=y", "no_such_key=1")
    assert code == 1 and "no_such_key" in err
    code, err = run_cli(capsys, "out=y")
    assert code == 1 and "source" in err
    done = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "shard_size_tokens" in done.stdout and "tokenizer.vocab_size" in done.stdout


def test_data_config_rejects_impossible_values():
    for bad, key in [({"source": "web"}, "data.source"), ({"source": "shards"}, "data.path"),
                     ({"source": "stdlib", "path": "x"}, "data.path"), ({"vocab_size": 10}, "data.vocab_size"),
                     ({"held_out_fraction": 1.5}, "data.held_out_fraction"), ({"workers": -1}, "data.workers"),
                     ({"verify": "yes"}, "data.verify")]:
        with pytest.raises(ValueError, match=key):
            DataConfig(**bad)
    from data.config import MixtureSource
    with pytest.raises(ValueError, match="weight"):
        MixtureSource("a", 0.0)
    with pytest.raises(ValueError, match="twice"):
        DataConfig(source="shards", mixture=[MixtureSource("a"), MixtureSource("a")])


def test_group_yamls_match_the_schema():
    from omegaconf import OmegaConf
    for name in ("stdlib", "shards"):
        yaml = OmegaConf.load(ROOT / "configs" / "data" / f"{name}.yaml")
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), yaml)
        if name == "shards":
            merged.path = "/some/dir"
        assert OmegaConf.to_object(merged).source == name
