"""The task generators: MQAR against Zoology's construction, passkey prompts, the scorer, and the
generated training data (data=mqar / data=passkey) resuming exactly."""
import numpy as np
import pytest
import torch

from configs.errors import ConfigError
from data import prepare_dataset
from data.config import DataConfig
from data.synthetic import (IGNORE, PASSKEY_FILLER, PASSKEY_QUESTION, PasskeyPrompts, check_mqar, mqar_example,
                            mqar_set, passkey_answer, passkey_correct, passkey_tokenizer)


def zoology_multiquery_ar(vocab_size, num_examples, input_seq_len, seed, power_a=0.01, num_kv_pairs=8):
    """zoology/data/associative_recall.py's multiquery_ar (random_non_queries=True), in numpy."""
    np.random.seed(seed)
    context_size = num_kv_pairs * 2
    key_vocab_size = vocab_size // 2
    keys = np.stack([np.random.choice(np.arange(1, key_vocab_size), num_kv_pairs, replace=False)
                     for _ in range(num_examples)])
    values = np.stack([np.random.choice(np.arange(key_vocab_size, vocab_size), num_kv_pairs, replace=False)
                       for _ in range(num_examples)])
    kvs = np.zeros((num_examples, context_size), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    space = (input_seq_len - context_size) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    gaps = np.stack([np.random.choice(space, num_kv_pairs, replace=False, p=p) for _ in range(num_examples)])
    queries = np.zeros((num_examples, input_seq_len - context_size + 1), dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, values=keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((num_examples, input_seq_len + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + context_size + 1, values=values, axis=1)
    inputs, labels = examples[:, :-1], labels[:, 1:]
    inputs[inputs == 0] = np.random.randint(vocab_size, size=inputs.shape)[inputs == 0]
    return inputs, labels


def check_recall_structure(inputs, labels, vocab, pairs):
    """Each labelled position holds a key of the prefix and its label is that key's value."""
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and np.all((keys >= 1) & (keys < vocab // 2))
        assert np.all((values >= vocab // 2) & (values < vocab))
        queried = np.nonzero(y != IGNORE)[0]
        assert len(queried) == pairs and np.all((queried - 2 * pairs) % 2 == 0)
        assert dict(zip(keys, values)) == dict(zip(x[queried], y[queried]))


def test_mqar_matches_zoology_construction():
    vocab, pairs, seq_len, n = 128, 6, 96, 1500
    ours_x, ours_y = mqar_set(0, n, vocab, pairs, seq_len, 0.01)
    zoo_x, zoo_y = zoology_multiquery_ar(vocab, n, seq_len, seed=0, num_kv_pairs=pairs)
    assert ours_x.shape == zoo_x.shape == ours_y.shape == zoo_y.shape == (n, seq_len)
    check_recall_structure(ours_x[:200], ours_y[:200], vocab, pairs)
    check_recall_structure(zoo_x[:200], zoo_y[:200], vocab, pairs)
    # The same distribution of query positions (the power-law gaps), and of filler tokens.
    ours_pos, zoo_pos = np.nonzero(ours_y != IGNORE)[1], np.nonzero(zoo_y != IGNORE)[1]
    assert abs(ours_pos.mean() - zoo_pos.mean()) < 0.03 * zoo_pos.mean()
    ours_hist = np.bincount(ours_pos, minlength=seq_len) / len(ours_pos)
    zoo_hist = np.bincount(zoo_pos, minlength=seq_len) / len(zoo_pos)
    assert np.abs(ours_hist - zoo_hist).sum() < 0.1  # total variation
    assert abs(ours_x[:, 2 * pairs:].mean() - zoo_x[:, 2 * pairs:].mean()) < 1.0


def test_mqar_is_seeded_and_jrt_repeats_the_context():
    a = mqar_example(np.random.default_rng([3, 7]), 64, 4, 32, 0.01)
    b = mqar_example(np.random.default_rng([3, 7]), 64, 4, 32, 0.01)
    c = mqar_example(np.random.default_rng([3, 8]), 64, 4, 32, 0.01)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])
    jx, jy = mqar_example(np.random.default_rng([3, 7]), 64, 4, 32, 0.01, jrt=True)
    assert len(jx) == 32 + 8 and np.array_equal(jx[:8], jx[8:16]) and np.array_equal(jx[:8], a[0][:8])
    assert np.array_equal(jx[16:], a[0][8:]) and np.array_equal(jy[16:], a[1][8:]) and np.all(jy[:16] == IGNORE)
    with pytest.raises(ConfigError, match="num_kv_pairs"):
        check_mqar(64, 9, 32, 0.01, "eval.mqar.")


def test_passkey_prompt_lengths_depths_and_scorer(tmp_path):
    tokenizer = passkey_tokenizer(DataConfig(source="passkey", vocab_size=512, cache_dir=str(tmp_path)))
    prompts = PasskeyPrompts(tokenizer)
    for length in (100, 200, 777):
        n = prompts.fillers_for(length)
        tokens = prompts.prompt(n, 0.5, "12345")
        assert length - len(prompts.filler) < len(tokens) <= length
    text = tokenizer.decode(prompts.prompt(4, 0.0, "12345"))
    assert text.index("The pass key is 12345. Remember it. 12345 is the pass key.") < text.index(PASSKEY_FILLER)
    assert text.endswith(PASSKEY_QUESTION)
    deep = tokenizer.decode(prompts.prompt(4, 1.0, "12345"))
    assert deep.index("12345") > deep.index(PASSKEY_FILLER * 4) and deep.count(PASSKEY_FILLER) == 4
    assert tokenizer.decode(prompts.prompt(2, 0.5, "54321", jrt=True)).count("54321 is the pass key") == 2
    # The scorer: the continuation must start with exactly the key.
    assert passkey_correct(" 12345.", "12345") and passkey_correct("12345 is it", "12345")
    assert not passkey_correct(" 123456.", "12345") and not passkey_correct(" 1234.", "12345")
    assert not passkey_correct(" the key is 12345", "12345") and passkey_answer(" x") is None


def test_mqar_training_data_resumes_exactly(tmp_path):
    dataset = prepare_dataset(DataConfig(source="mqar", vocab_size=64, num_kv_pairs=4, cache_dir=str(tmp_path)))
    assert dataset.tokenizer is None and dataset.vocab_size == 64
    straight = dataset.loader(32, 2, 4, seed=5)
    batches = [next(straight) for _ in range(4)]
    assert batches[0]["input_ids"].shape == (2, 32) and batches[0]["cu_seqlens"].tolist() == [0, 32, 64]
    assert ((batches[0]["labels"] != IGNORE).sum(1) == 4).all()
    resumed = dataset.loader(32, 2, 4, seed=5)
    next(resumed), next(resumed)
    state = resumed.state_dict()
    fresh = dataset.loader(32, 2, 4, seed=5)
    fresh.load_state_dict(state)
    for expected in batches[2:]:
        got = next(fresh)
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])
    # Two data-parallel ranks read the rows one rank reads, in the same order.
    rank0, rank1 = dataset.loader(32, 1, 4, 0, 2, seed=5), dataset.loader(32, 1, 4, 1, 2, seed=5)
    first = torch.cat([next(rank0)["input_ids"], next(rank1)["input_ids"]])
    assert torch.equal(first, batches[0]["input_ids"])
    other = prepare_dataset(DataConfig(source="mqar", vocab_size=64, num_kv_pairs=3, cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="other training data"):
        other.loader(32, 2, 4, seed=5).load_state_dict(state)


def test_passkey_training_rows(tmp_path):
    dataset = prepare_dataset(DataConfig(source="passkey", vocab_size=512, cache_dir=str(tmp_path)))
    batch = next(dataset.loader(128, 4, 4, seed=0))
    tokenizer = dataset.tokenizer
    for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        scored = [t for t in labels if t != IGNORE]
        text = tokenizer.decode(inputs[1:len(scored)])
        key = text.split("The pass key is ")[1][:5]
        assert text.endswith(f"{PASSKEY_QUESTION} {key}.") and labels[len(scored) - 1] == tokenizer.eos_id
        assert labels[:len(scored) - 1] == inputs[1:len(scored)]
    with pytest.raises(ConfigError, match="too short"):
        dataset.loader(16, 1, 1)
