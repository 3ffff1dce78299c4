"""`python -m eval` end to end on tiny checkpoints: one results JSON, the PNGs and the summary table;
bad input gets one line and exit 2; a FSDP checkpoint evaluates like the one-process one."""
import json
import shutil
import subprocess
import sys

import pytest

from eval.__main__ import main
from tests.eval.tiny_checkpoints import REPO, save_fsdp_checkpoint

TASKS = "tasks=[ppl,passkey,mqar]"


def test_cli_writes_results_plots_and_table(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([f"checkpoint={tiny_checkpoint}", TASKS, f"out={out}", "eval.mqar.jrt=true"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["step"] == 3 and results["model"]["pattern"] == "GA" and set(results["tasks"]) == {
        "ppl", "passkey", "mqar"}
    ppl = results["tasks"]["ppl"]
    assert ppl["settings"]["max_len"] == 160 and ppl["buckets"][-1]["end"] == 160
    assert results["held_out_bpb"] > 0 and results["ppl_loss_beyond_train_len"] > 0
    assert len(results["tasks"]["passkey"]["accuracy"]) == 2 and len(results["tasks"]["passkey"]["outputs"]) == 8
    assert results["tasks"]["mqar"]["settings"] == {"vocab_size": 512, "num_kv_pairs": 4, "seq_len": 64,
                                                    "power_a": 0.01, "num_examples": 8, "seed": 0, "jrt": True}
    assert 0 <= results["mqar_accuracy"] <= 1
    for png in ("ppl_by_position.png", "passkey.png"):
        assert (out / png).stat().st_size > 1000
    table = capsys.readouterr().out
    assert "mqar_accuracy" in table and "held_out_bpb" in table


@pytest.mark.parametrize("args, expected", [
    (["tasks=[ppl,recall]"], "recall"),
    (["eval.passkey.depths=[1.5]"], "eval.passkey.depths"),
    (["eval.no_such_setting=1"], "eval.no_such_setting"),
    (["tasks=[ppl,mqar]", "eval.mqar.num_kv_pairs=40"], "num_kv_pairs"),
])
def test_bad_task_or_setting_is_one_line(tiny_checkpoint, tmp_path, capsys, args, expected):
    assert main([f"checkpoint={tiny_checkpoint}", f"out={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and expected in err
    assert list(tmp_path.iterdir()) == []


def test_unloadable_checkpoint_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "eval", f"checkpoint={tmp_path / 'missing'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr, proc.stderr
    incomplete = tmp_path / "run" / "checkpoints" / "step_000001"
    incomplete.mkdir(parents=True)
    shutil.copy(tiny_checkpoint.parents[1] / "config.yaml", tmp_path / "run")
    assert main([f"checkpoint={incomplete}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and str(incomplete) in err


@pytest.mark.slow
def test_fsdp_checkpoint_evaluates_like_the_single_process_one(tiny_checkpoint, tmp_path):
    """Both start from the same seeded weights (parallel/materialize.py), whatever the engine."""
    fsdp = save_fsdp_checkpoint(tmp_path / "fsdp")
    figures = {}
    for name, checkpoint in (("single", tiny_checkpoint), ("fsdp", fsdp)):
        assert main([f"checkpoint={checkpoint}", "tasks=[ppl,mqar]", f"out={tmp_path / name}"]) == 0
        figures[name] = json.loads((tmp_path / name / "eval.json").read_text())
    for key in ("held_out_loss", "ppl_loss_beyond_train_len", "mqar_accuracy"):
        assert figures["fsdp"][key] == pytest.approx(figures["single"][key], rel=1e-5)
