#!/usr/bin/env bash
# Build the wheels a GPU machine without network needs, on top of its own torch, triton, pytest and
# pytest-xdist, to run train.py and `python -m bench.gpu_check` (README, "GPU check"):
#   - hydra-core and omegaconf at requirements.txt's pins, and antlr4-python3-runtime 4.9.3 (hydra's parser
#     runtime; PyPI has it as a source archive only, so `pip wheel` builds it here into a wheel);
#   - flash-linear-attention 0.6.0 (fla-core holds the ops the kernel comparison calls) and einops.
# Run it on a machine with PyPI; carry the folder over and install there, offline:
#   scripts/gpu_wheels.sh [DIR] [PACKAGE ...]    # DIR default: the repo's .whl/ (ignored by git); PACKAGE: extra wheels
#   python -m pip install --no-index --no-deps DIR/*.whl        # on the GPU machine
# --no-deps both ways: pip never fetches or replaces torch or triton, which the GPU machine has in its own
# CUDA build. If the dry run there (`python -m bench.gpu_check --dry-run`) reports another missing module,
# build its wheel here as an extra PACKAGE.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/.whl}"
shift || true
python="${PYTHON:-python3}"
pins=$(grep -E '^(hydra-core|omegaconf)==' "$repo/requirements.txt")
# shellcheck disable=SC2086  # $pins: one package spec per word
"$python" -m pip wheel --no-deps --wheel-dir "$out" $pins antlr4-python3-runtime==4.9.3 \
    fla-core==0.6.0 flash-linear-attention==0.6.0 einops==0.8.2 "$@"
ls -l "$out"
