"""Setup shared by the whole suite.

Without a GPU the Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 has to be in the environment
before `triton` is first imported (triton.language's own @jit helpers are decorated then) and before any kernel
is decorated. Other packages import triton too (transformers does, for the Hugging Face tests), so it is set
here, before any test module is collected. On CPU it changes nothing else: the kernels' entry points take the
PyTorch path unless a test forces Triton (kernels/backend.py).

`make test` runs the suite in one pytest-xdist worker per core; each worker then uses one intra-op thread.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_scan

    interpreter_scan.install()  # the scans' kernels, a tile row at a time instead of an element at a time
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test`: a worker per core, so one intra-op thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A one-process training checkpoint of a tiny data=passkey model (tests/eval/tiny_checkpoints.py)."""
    from tests.eval.tiny_checkpoints import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "run")


def pytest_collection_modifyitems(config, items):
    """Modules with long tests first: the end-to-end and multi-process ones (`slow`, `gpu_compile`), then those
    running Triton's interpreter (`gpu`). pytest-xdist hands a worker the next module in this order, so the quick
    modules come last and even out the workers' ends instead of one long module running alone."""
    def rank(module: str) -> int:
        markers = markers_by_module[module]
        return 0 if markers & {"slow", "gpu_compile"} else 1 if "gpu" in markers else 2

    markers_by_module: dict[str, set] = {}
    for item in items:
        markers_by_module.setdefault(item.module.__name__, set()).update(m.name for m in item.iter_markers())
    items.sort(key=lambda item: rank(item.module.__name__))  # stable: each module's own order is kept
