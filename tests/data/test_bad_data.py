"""Bad input: one clear error naming the file and the problem, non-zero exit, nothing prepared destroyed."""
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
from data.shards import ShardSet
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


def test_corrupted_shard(copy):
    shard = copy / "train" / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard}: corrupted"):
        ShardSet(copy / "train")
    ShardSet(copy / "train", verify_checksums=False)  # the size still matches: only the checksum can tell


def test_index_that_disagrees_with_its_shard(copy):
    index = copy / "train" / "shard_00002.idx"
    with np.load(index) as z:
        arrays = dict(z)
    arrays["doc_offsets"] = arrays["doc_offsets"] + np.arange(len(arrays["doc_offsets"]))  # one more token per doc
    with open(index, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match=f"{copy / 'train' / 'shard_00002.bin'}: truncated"):
        ShardSet(copy / "train")
    shutil.copy(copy / "train" / "shard_00000.idx", index)  # a whole other shard's index
    with pytest.raises(ValueError, match="shard_00002"):
        ShardSet(copy / "train")
    index.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{index}: unreadable shard index"):
        ShardSet(copy / "train")


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
                     ({"held_out_fraction": 1.5}, "data.held_out_fraction"), ({"workers": -1}, "data.workers")]:
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
