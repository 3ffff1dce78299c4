#!/usr/bin/env bash
# The image's entrypoint: Hydra overrides (or nothing) start torchrun on every GPU of the machine, any
# other command runs as given. It stays in the working directory: /baton (the image's WORKDIR), or the
# checkout a container runtime on Slurm mounts and starts in (docker/README.md).
#   docker run ... baton                            torchrun --nproc-per-node=gpu train.py
#   docker run ... baton model=gla_1b3 run.dir=...  torchrun --nproc-per-node=gpu train.py model=gla_1b3 ...
#   docker run ... baton python -m eval checkpoint=...   as given
# torchrun's other options come from the environment as PET_<OPTION>: PET_NNODES, PET_NODE_RANK,
# PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID (docker/README.md, multi-node). NPROC_PER_NODE
# overrides the process count. exec: torchrun gets docker's SIGTERM itself and hands it to the ranks.
set -euo pipefail
if [[ $# -eq 0 || "$1" == *=* ]]; then
    set -- torchrun --nproc-per-node="${NPROC_PER_NODE:-gpu}" train.py "$@"
fi
exec "$@"
