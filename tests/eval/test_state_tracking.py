"""State tracking (data=state_tracking, the state_tracking eval task): the generator's labels are the group
products (computed here with permutation matrices), the scorer gives a perfect predictor 1.0 and a wrong one
less, and bad settings are one-line errors."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import prepare_dataset
from data.config import DataConfig
from data.synthetic import group_table, state_tracking_example, state_tracking_set
from eval.config import EvalConfig, StateTrackingConfig
from eval.state_tracking import run, state_tracking_accuracy, state_tracking_settings

DEGREE = {"parity": 2, "s3": 3, "s5": 5}


def permutation_matrix(perm: tuple[int, ...]) -> np.ndarray:
    """M with M e_i = e_perm(i): M_a M_b is the matrix of i -> a(b(i))."""
    m = np.zeros((len(perm), len(perm)), np.int64)
    m[list(perm), range(len(perm))] = 1
    return m


@pytest.mark.parametrize("group", ["parity", "s3", "s5"])
def test_labels_are_the_running_products(group):
    perms = sorted(itertools.permutations(range(DEGREE[group])))  # token i is the i-th in lexicographic order
    matrices = [permutation_matrix(p) for p in perms]
    inputs, labels = state_tracking_example(np.random.default_rng(7), group, 40)
    assert inputs.shape == labels.shape == (40,) and inputs.min() >= 0 and inputs.max() < len(perms)
    product = np.eye(DEGREE[group], dtype=np.int64)
    for x, label in zip(inputs, labels):
        product = product @ matrices[x]
        assert np.array_equal(matrices[label], product)
    if group == "parity":
        assert np.array_equal(labels, np.cumsum(inputs) % 2)  # token 1 is the swap


def test_s3_is_not_commutative_and_rows_are_seeded():
    table = group_table("s3")
    assert not np.array_equal(table, table.T)  # the order of the elements matters
    assert sorted(table[0]) == list(range(6)) and (table[:, 0] == np.arange(6)).all()  # 0 is the identity
    a, b = state_tracking_set(3, 4, "s5", 16), state_tracking_set(3, 4, "s5", 16)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0][0], a[0][1])


def test_training_rows_and_their_resume_state(tmp_path):
    dataset = prepare_dataset(DataConfig(source="state_tracking", group="s3", cache_dir=str(tmp_path)))
    assert dataset.vocab_size == 6 and dataset.tokenizer is None
    loader = dataset.loader(24, 2, 4, seed=5)
    batch = next(loader)
    table = group_table("s3")
    for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        products = list(itertools.accumulate(row, lambda p, x: table[p, x]))
        assert labels == products
    other = prepare_dataset(DataConfig(source="state_tracking", group="parity", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="other training data"):
        other.loader(24, 2, 4, seed=5).load_state_dict(loader.state_dict())


class ProductOracle(torch.nn.Module):
    """Logits on the running product; with `window`, the product of only the last `window` elements (right
    up to that length, wrong beyond it: a model that did not learn to carry its state)."""

    def __init__(self, group: str, window: int | None = None):
        super().__init__()
        self.table, self.window = group_table(group), window

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*inputs.shape, 128)
        for b, row in enumerate(inputs.tolist()):
            for t in range(len(row)):
                start = 0 if self.window is None else max(0, t + 1 - self.window)
                product = 0
                for x in row[start:t + 1]:
                    product = self.table[product, x]
                logits[b, t, product] = 1.0
        return logits


def config(**state_tracking) -> SimpleNamespace:
    return SimpleNamespace(eval=EvalConfig(batch_size=16, state_tracking=StateTrackingConfig(**state_tracking)),
                           train=SimpleNamespace(seq_len=16), data=DataConfig(source="state_tracking", group="s3"))


def test_a_perfect_predictor_scores_one_and_a_forgetful_one_less(tmp_path):
    cfg, dataset = config(num_examples=40), SimpleNamespace(tokenizer=None, vocab_size=6)
    settings = state_tracking_settings(cfg, dataset)
    assert settings["group"] == "s3" and settings["lengths"] == [16, 32, 64]
    perfect = run(cfg, ProductOracle("s3"), dataset, torch.device("cpu"), progress=False)
    assert perfect.figures == {"state_tracking_accuracy_16": 1.0, "state_tracking_accuracy_32": 1.0,
                               "state_tracking_accuracy_64": 1.0}
    forgetful = state_tracking_accuracy(ProductOracle("s3", window=16), settings, 16, torch.device("cpu"),
                                      progress=False)
    assert forgetful[16][0] == 1.0 and forgetful[64][0] < 0.5
    assert (forgetful[64][1][:16] == 1.0).all() and forgetful[64][1][16:].mean() < 0.5
    png = perfect.plot(tmp_path)
    assert png.name == "state_tracking.png" and png.stat().st_size > 1000


@pytest.mark.parametrize("make, message", [
    (lambda: DataConfig(source="state_tracking", group="s4"), "data.group: 's4' is not one of parity, s3, s5"),
    (lambda: EvalConfig(state_tracking=StateTrackingConfig(lengths=[0])),
     "eval.state_tracking: lengths must be >= 1"),
    (lambda: EvalConfig(state_tracking=StateTrackingConfig(num_examples=0)), "num_examples >= 1"),
    (lambda: state_tracking_settings(config(group="a5"), SimpleNamespace(tokenizer=None, vocab_size=6)),
     "eval.state_tracking.group: 'a5'"),
    (lambda: state_tracking_settings(config(group="s5"), SimpleNamespace(tokenizer=None, vocab_size=64)),
     "has 120 elements, more than the run's vocabulary 64"),
])
def test_bad_settings_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)
