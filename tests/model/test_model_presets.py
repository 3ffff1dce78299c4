"""Every preset in configs/model builds (the large ones on the meta device) to the size it states."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from model import LM

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "model").glob("*.yaml"))


def test_every_size_and_family_has_a_preset():
    names = {path.stem for path in PRESETS}
    for size in ("125m", "370m", "1b3", "7b"):
        for family in ("transformer", "gla", "gla_hybrid", "mamba2", "mamba2_hybrid", "gated_deltanet",
                       "gated_deltanet_hybrid"):
            assert f"{family}_{size}" in names
    assert {"hybrid_tiny", "transformer_tiny"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.stem)
def test_preset_parameter_count_matches_its_statement(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem
    with torch.device("meta"):
        lm = LM.from_config(cfg)
    assert lm.config.expected_params is not None, f"{path.name} states no expected_params"
    assert lm.num_params() == pytest.approx(lm.config.expected_params, rel=0.01)


def test_tiny_presets_match_each_other_and_run():
    hybrid, transformer = (LM.from_config(OmegaConf.load(path)) for path in PRESETS
                           if path.stem in ("hybrid_tiny", "transformer_tiny"))
    assert hybrid.num_params() == pytest.approx(transformer.num_params(), rel=0.02)
    ids = torch.randint(0, hybrid.config.vocab_size, (1, 16))
    assert hybrid(ids).shape == transformer(ids).shape == (1, 16, hybrid.config.vocab_size)
