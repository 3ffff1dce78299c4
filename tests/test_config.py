"""Config validation: every bad value fails at start-up with one line, a non-zero exit, and no files."""
import subprocess
import sys
from pathlib import Path

import pytest

import train
from configs.schema import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, expected", [
    ("train.no_such_key=1", "no_such_key"),
    ("+train.no_such_key=1", "train.no_such_key"),
    ("+model.gla.no_such_key=1", "model.gla.no_such_key"),
    ("train.max_steps=many", "max_steps"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.schedule=linear_warmdown", "optim.schedule"),
    ("train.seq_len=100", "train.seq_len"),
    ("model.pattern=GQA", "model.pattern"),
    ("logging.wandb.mode=sometimes", "logging.wandb.mode"),
    ("train.micro_batch_size=3", "global_batch_size"),  # the default global batch 8 is no multiple of 3
    ("model=no_such_preset", "no_such_preset"),
])
def test_bad_config_is_one_line_and_writes_nothing(override, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert train.main([override, f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert expected in err
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


def test_cli_exit_code_and_single_line():
    proc = subprocess.run([sys.executable, "train.py", "optim.lr=-1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "optim.lr" in proc.stderr


def test_overrides_reach_every_group():
    cfg, raw = load_config(["train.max_steps=7", "optim.lr=0.01", "model=transformer_tiny", "run.dir=runs/x"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 0.01 and cfg.run.dir == "runs/x"
    assert set(cfg.model.pattern) == {"A"} and raw.model.pattern == cfg.model.pattern
