"""checkpoints.save_export / load_model: safetensors + config.json round trip, clear errors."""
import json

import pytest
import torch

from checkpoints import load_model, save_export
from configs.errors import CheckpointError

VOCAB = 97  # tests/model/conftest.py's small models


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_gives_the_same_logits(make_lm, tmp_path, tie):
    lm = make_lm("GMDAW", tie_embeddings=tie)
    save_export(lm, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["pattern"] == "GMDAW"
    loaded = load_model(tmp_path / "export").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), lm(ids), atol=0, rtol=0)
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie


def test_a_directory_that_is_no_checkpoint_is_one_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: not a complete checkpoint"):
        load_model(tmp_path)
