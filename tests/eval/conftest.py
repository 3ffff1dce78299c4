from pathlib import Path

import pytest

from tests.eval.tiny_checkpoints import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A one-process training checkpoint of a tiny data=passkey model (tests/eval/tiny_checkpoints.py)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "run")
