"""`python -m bench.gpu_check --dry-run` on CPU: every step short of the GPU works and lands in the JSON, and a
budget too small for the work is reported, not fatal."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECURRENT_OPS = ("gla", "gla_scalar", "gated_delta_rule")
PRESETS = ("transformer_370m", "gla_hybrid_370m", "mamba2_hybrid_370m", "gated_deltanet_hybrid_370m")


def gpu_check(out: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout)
    written = list(out.glob("gpu_check_*.json"))
    assert len(written) == 1, f"{written}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result, json.loads(written[0].read_text())


@pytest.mark.slow
def test_dry_run_checks_every_stage(tmp_path):
    result, report = gpu_check(tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["dry_run"] and report["finished"] and report["dry_run_passed"], report
    assert report["versions"]["torch"] and report["versions"]["triton"] and "fla" in report["versions"]
    assert report["device"]["device"].startswith("cpu") and report["date"] and "commit" in report["git"]
    stages = report["stages"]
    assert {name: stage["status"] for name, stage in stages.items()} == dict.fromkeys(
        ("setup", "tests", "kernels", "training"), "ok")

    assert {p["preset"] for p in stages["setup"]["presets"]} == set(PRESETS)
    for preset in stages["setup"]["presets"]:  # the MFU numerator: about 6 FLOPs per parameter and token
        assert preset["params_m"] > 300 and 0.98 <= preset["flops_per_token"] / (6e6 * preset["params_m"]) < 1.5
    assert stages["tests"]["collected"] >= 1  # tests marked gpu, collected with --collect-only -m gpu

    rows = stages["kernels"]["rows"]
    shapes = {row["shape"] for row in rows}
    assert len(shapes) >= 2 and {(row["op"], row["shape"]) for row in rows} == {
        (op, shape) for op in ("sdpa",) + RECURRENT_OPS for shape in shapes}
    for row in rows:
        assert "error" not in row, row
        if row["op"] == "sdpa":
            assert row["sdpa_ms"] > 0
            continue
        assert row["ours_ms"] > 0 and ("fla_ms" in row or row["fla_error"]), row  # fla measured or its reason
        errors = row["check"]["rel_errors"]
        assert set(errors) >= {"o", "dq", "dk", "dv", "dg"} and row["check"]["passed"], row
        assert 0 < max(errors.values()) <= stages["kernels"]["tolerance"]  # bf16 against fp32: never exactly 0
    assert stages["kernels"]["check_passed"] and report["numerical_check_passed"]

    training = {row["preset"]: row for row in stages["training"]["rows"]}
    assert set(training) == set(PRESETS)
    for row in training.values():
        assert "error" not in row and row["steps_measured"] >= 1 and row["tokens_per_s"] > 0, row
        assert row["peak_mem_gib"] > 0 and "mfu" not in row  # no MFU on a CPU (no known peak)

    for title in ("Stages", "Kernels, forward + backward", "Training,", "results written to"):
        assert title in result.stdout


def test_a_budget_too_small_is_reported_not_fatal(tmp_path):
    started = time.perf_counter()
    result, report = gpu_check(tmp_path, "--budget-s", "12", "--stages", "kernels", "training", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.perf_counter() - started < 60  # killed at the deadline, not run to the end
    stages = report["stages"]
    assert report["finished"] and not report["dry_run_passed"]
    assert stages["tests"]["status"] == "skipped"
    assert stages["kernels"]["status"] == "timeout" and stages["training"]["status"] == "timeout", stages
    assert any("stopped at its budget" in note for note in stages["kernels"]["notes"])
    assert all("stopped at its budget" in row["error"] for row in stages["training"]["rows"])
    assert "Not done or not as planned" in result.stdout
