"""Every preset in configs/model builds (the large ones on the meta device) to the size it states, at the
vocabulary its counts assume (the presets follow the data's: vocab_size null)."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data.config import DataConfig
from model import LM

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "model").glob("*.yaml"))
TINY = ("hybrid_tiny", "transformer_tiny")
# What the counts in the presets and the README's table assume: the tiny ones the embedded data's tokenizer
# (what `make train` trains on), the 125M-7B ones a 32,000-token vocabulary.
COUNTED_AT_VOCAB = {name: DataConfig().vocab_size for name in TINY}
COUNTED_AT_VOCAB.update({path.stem: DataConfig().vocab_size for path in PRESETS if path.stem.endswith("_tiny")})
LARGE_VOCAB = 32000


def load_preset(path: Path):
    cfg = OmegaConf.load(path)
    assert cfg.vocab_size is None, f"{path.name} fixes its vocabulary instead of following the data's"
    cfg.vocab_size = COUNTED_AT_VOCAB.get(path.stem, LARGE_VOCAB)
    assert f"{cfg.vocab_size:,}-token vocabulary" in path.read_text(), f"{path.name} does not say what it counts at"
    return cfg


def test_every_size_and_family_has_a_preset():
    names = {path.stem for path in PRESETS}
    for size in ("125m", "370m", "1b3", "7b"):
        for family in ("transformer", "gla", "gla_hybrid", "mamba2", "mamba2_hybrid", "gated_deltanet",
                       "gated_deltanet_hybrid"):
            assert f"{family}_{size}" in names
    assert set(TINY) <= names


@pytest.mark.slow  # every preset (about 50), each built on the meta device: a sweep, left out of test-fast
@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.stem)
def test_preset_parameter_count_matches_its_statement(path):
    cfg = load_preset(path)
    assert cfg.name == path.stem
    with torch.device("meta"):
        lm = LM.from_config(cfg)
    assert lm.config.expected_params is not None, f"{path.name} states no expected_params"
    assert lm.num_params() == pytest.approx(lm.config.expected_params, rel=0.01)


def test_tiny_presets_match_each_other_and_run():
    hybrid, transformer = (LM.from_config(load_preset(path)) for path in PRESETS if path.stem in TINY)
    assert hybrid.num_params() == pytest.approx(transformer.num_params(), rel=0.02)
    ids = torch.randint(0, hybrid.config.vocab_size, (1, 16))
    assert hybrid(ids).shape == transformer(ids).shape == (1, 16, hybrid.config.vocab_size)
