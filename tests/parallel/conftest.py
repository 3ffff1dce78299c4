"""The multi-process harness of the parallel tests: `spawn(worker, world_size, *args)` runs
`worker(rank, world_size, *args)` in world_size fresh processes joined in one gloo process group.

Each process sees torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), so code that joins torchrun's
group (parallel/topology.py, deepspeed.init_distributed) finds this one already joined, and uses one
intra-op thread: several processes share few cores. A worker that raises fails the test with its traceback.
This folder is a package (tests/parallel/__init__.py) so that the children import the workers and this
module by unambiguous names.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.mesh import leave_process_group


def _in_gloo_group(rank: int, worker, world_size: int, init_file: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    worker(rank, world_size, *args)
    leave_process_group()  # a worker that raised skips this; mp.spawn then ends the others


def spawn_gloo(worker, world_size: int, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_in_gloo_group, args=(worker, world_size, os.path.join(tmp, "init"), args), nprocs=world_size,
                 join=True)


@pytest.fixture
def spawn():
    return spawn_gloo
