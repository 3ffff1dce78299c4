"""The task code on tiny models: the per-position curve (state carried = the document scored in one
piece), and the passkey and MQAR scoring against oracle models whose answers are known."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.config import DataConfig
from data.synthetic import PASSKEY_DIGITS, mqar_set, passkey_tokenizer
from eval.mqar import mqar_accuracy
from eval.passkey import passkey_grid, plot_passkey
from eval.perplexity import loss_by_position, position_edges
from model import LM

EOS = 2


def tiny_lm(pattern: str, vocab: int = 96) -> LM:
    torch.manual_seed(0)
    return LM.from_config({"vocab_size": vocab, "d_model": 64, "pattern": pattern, "gla": {"num_heads": 2},
                           "attention": {"num_heads": 2}}).eval()


@pytest.mark.parametrize("pattern", ["GG", "GA"])
def test_loss_by_position_carries_the_state_across_the_whole_length(pattern):
    """Scored in chunks of 24 with the state carried, out to 4 x 24 tokens, the curve is the per-position
    loss of each document scored in one piece."""
    model, max_len = tiny_lm(pattern), 96
    rng = np.random.default_rng(0)
    documents = [(rng.integers(3, 96, size=n), n) for n in (50, 120, 97, 300, 96)]  # the 50-token one is too short
    curve = loss_by_position(model, iter(documents), EOS, max_len, max_documents=3, num_buckets=8, chunk_len=24,
                             batch_size=2, device=torch.device("cpu"), progress=False)
    assert curve.documents == 3 and curve.loss.shape == (max_len,)
    rows = torch.tensor(np.stack([np.concatenate([[EOS], d[:max_len]]) for d, _ in documents[1:4]]))
    with torch.no_grad():
        logits = model(rows[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none").mean(0)
    assert np.allclose(curve.loss, expected.numpy(), atol=1e-4)
    buckets = curve.buckets()
    assert buckets[0]["start"] == 1 and buckets[-1]["end"] == max_len
    assert all(a["end"] + 1 == b["start"] for a, b in zip(buckets, buckets[1:]))
    assert curve.mean_between(25, 96) == pytest.approx(float(expected[24:].mean()), abs=1e-4)
    assert position_edges(4, 10) == [1, 2, 3, 4, 5]


class PasskeyOracle(torch.nn.Module):
    """Answers with the key in its prompt (or, wrong, that key's digits reversed), as token ids."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong

    def generate(self, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        rows = []
        for prompt in prompts.tolist():
            key = re.search(r"pass key is (\d{%d})" % PASSKEY_DIGITS, self.tokenizer.decode(prompt)).group(1)
            answer = self.tokenizer.encode(f" {key[::-1] if self.wrong else key}. The")[:max_new_tokens]
            rows.append(prompt + answer + [EOS] * (max_new_tokens - len(answer)))
        return torch.tensor(rows)


def test_passkey_grid_scores_known_answers(tmp_path):
    tokenizer = passkey_tokenizer(DataConfig(source="passkey", vocab_size=512, cache_dir=str(tmp_path)))
    lengths, depths = [80, 200, 400], [0.0, 0.5, 1.0]
    right = passkey_grid(PasskeyOracle(tokenizer), tokenizer, lengths, depths, 3, 0, False, torch.device("cpu"),
                         progress=False)
    assert right["accuracy"].shape == (3, 3) and np.all(right["accuracy"] == 1.0)
    assert len(right["outputs"]) == 27 and all(o["output"].startswith(f" {o['key']}.") for o in right["outputs"])
    assert all(n <= length for n, length in zip(right["prompt_tokens"], lengths))
    wrong = passkey_grid(PasskeyOracle(tokenizer, wrong=True), tokenizer, lengths, depths, 3, 0, True,
                         torch.device("cpu"), progress=False)
    palindromes = sum(o["key"] == o["key"][::-1] for o in wrong["outputs"])
    assert wrong["accuracy"].sum() * 3 == palindromes
    png = plot_passkey(right["accuracy"], lengths, depths, 200, tmp_path)
    assert png.name == "passkey.png" and png.stat().st_size > 1000


class RecallOracle(torch.nn.Module):
    """Logits that put every key's value (from the key-value prefix) on the key's later occurrences."""

    def __init__(self, vocab: int, pairs: int):
        super().__init__()
        self.vocab, self.pairs = vocab, pairs

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*inputs.shape, self.vocab)
        for b, row in enumerate(inputs.tolist()):
            values = dict(zip(row[0:2 * self.pairs:2], row[1:2 * self.pairs:2]))
            for t, token in enumerate(row[2 * self.pairs:], start=2 * self.pairs):
                if token in values:
                    logits[b, t, values[token]] = 1.0
        return logits


def test_mqar_accuracy_on_known_predictions():
    settings = {"vocab_size": 64, "num_kv_pairs": 4, "seq_len": 64, "power_a": 0.01, "num_examples": 20, "seed": 1,
                "jrt": False}
    assert mqar_accuracy(RecallOracle(64, 4), settings, 8, torch.device("cpu"), progress=False) == 1.0
    # Predicting token 0 everywhere recalls nothing (values are >= vocab / 2).
    always_zero = RecallOracle(64, 0)  # no pairs known: every logit 0, argmax token 0
    assert mqar_accuracy(always_zero, settings, 8, torch.device("cpu"), progress=False) == 0.0
    inputs, labels = mqar_set(1, 20, 64, 4, 64, 0.01)
    assert inputs.shape == (20, 64) and ((labels >= 32) | (labels == -100)).all()
