"""The image and the shell scripts a cluster runs, checked without a Docker engine: hadolint on the
Dockerfile, shellcheck on the scripts (both pip packages of requirements.txt), the entrypoint's
translation to torchrun, and the image's pins against the CI ones."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = ["scripts/slurm/train.sbatch", "scripts/gpu_wheels.sh", "docker/entrypoint.sh", ".ci/run"]


def venv_tool(name: str) -> str:
    """The linters come with the virtual environment, whose bin/ need not be on PATH."""
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is not installed: it comes from requirements.txt (make setup)", pytrace=False)
    return path


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if "==" in line)


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([venv_tool("hadolint"), "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_shell_scripts_pass_shellcheck():
    proc = subprocess.run([venv_tool("shellcheck"), *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_builds_on_the_cuda_devel_image_and_the_ci_pins():
    base = re.search(r"^FROM (\S+)", (REPO / "docker" / "Dockerfile").read_text(), re.M).group(1)
    # devel: nvcc, which DeepSpeed's fused Adam is compiled with; the base's torch and triton are kept.
    assert re.fullmatch(r"pytorch/pytorch:2\.11\.\d+-cuda13\.\d+-cudnn\d+-devel", base), base
    image, ci = pins(REPO / "docker" / "requirements-gpu.txt"), pins(REPO / "requirements.txt")
    assert "torch" not in image and "triton" not in image
    assert {name: ci.get(name) for name in image} == image, "docker/requirements-gpu.txt drifted from requirements.txt"


@pytest.mark.parametrize("args, expected", [
    ([], ["torchrun", "--nproc-per-node=gpu", "train.py"]),
    (["model=gla_1b3", "run.dir=runs/x"], ["torchrun", "--nproc-per-node=gpu", "train.py", "model=gla_1b3", "run.dir=runs/x"]),
    (["python", "-m", "eval", "checkpoint=c"], ["python", "-m", "eval", "checkpoint=c"]),
])
def test_entrypoint_starts_torchrun_for_overrides_and_anything_else_as_given(tmp_path, args, expected):
    for name in ("torchrun", "python"):  # stand-ins that print what they were started with
        stub = tmp_path / name
        stub.write_text('#!/bin/sh\nfor a in "$0" "$@"; do echo "$a"; done\n')
        stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    proc = subprocess.run(["bash", str(REPO / "docker" / "entrypoint.sh"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    program, *argv = proc.stdout.splitlines()
    assert Path(program).name == expected[0] and argv == expected[1:]
