"""The packed loader: packing, cu_seqlens, rank slicing, exact resume and resharding, mixtures, bad input."""
import json
import mmap
from collections import Counter

import numpy as np
import pytest
import torch

from shard_fixtures import EOS, make_prepared, small_dataset, synthetic_docs  # noqa: F401 (fixture)
from data.loader import MIX_BLOCK, OPEN_SHARDS, PackedLoader


def full_rows(batch: dict) -> np.ndarray:
    """The packed rows [B, T + 1] of an sp=1 batch: input plus the last label."""
    return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()


def step_rows(loaders: list[PackedLoader], micro_steps: int) -> np.ndarray:
    """All rows of one optimizer step over data-parallel ranks, in global row order."""
    return np.concatenate([full_rows(next(loader)) for _ in range(micro_steps) for loader in loaders])


def expected_cu_seqlens(input_ids: torch.Tensor) -> list[int]:
    B, T = input_ids.shape
    starts = {b * T for b in range(B + 1)}
    for b in range(B):
        starts.update((b * T + torch.nonzero(input_ids[b] == EOS).flatten()).tolist())
    return sorted(starts)


def test_batch_format(small_dataset):
    train_dir, _ = small_dataset
    batch = next(PackedLoader(train_dir, 32, 4, 8, dp_rank=1, dp_size=2, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["starts_document"].dtype == torch.bool
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert batch["starts_document"].all()


def test_an_epoch_packs_every_document_once_after_an_eos(small_dataset):
    train_dir, docs = small_dataset
    loader = PackedLoader(train_dir, 16, 1, 1, seed=3)
    rows = [full_rows(next(loader))[0] for _ in range(loader.datasets[0].rows_per_epoch)]
    stream = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])  # consecutive rows share one token
    eos = np.flatnonzero(stream == EOS)
    assert eos[0] == 0
    segments = np.split(stream, eos[1:])
    complete = Counter(tuple(s[1:]) for s in segments[:-1])
    assert max(complete.values()) == 1, "a document was packed twice in one epoch"
    all_docs = Counter(tuple(d) for d in docs)
    assert not complete - all_docs, "a packed segment is not a document"
    # The documents not seen whole are exactly the epoch's tail: fewer than one row of tokens.
    unseen = sum(len(d) + 1 for d in all_docs - complete)
    assert unseen == sum(len(d) + 1 for d in docs) - sum(len(s) for s in segments[:-1])
    assert unseen - len(segments[-1]) < 16
    # The next epoch starts a fresh layout (a document's EOS first) in another order.
    next_epoch = full_rows(next(loader))[0]
    assert next_epoch[0] == EOS and not np.array_equal(next_epoch, rows[0])


def test_cu_seqlens_mark_row_starts_and_every_document_start(small_dataset):
    train_dir, _ = small_dataset
    loader = PackedLoader(train_dir, 24, 3, 3, seed=1)
    for _ in range(20):
        batch = next(loader)
        assert batch["cu_seqlens"].tolist() == expected_cu_seqlens(batch["input_ids"])


def test_same_seed_same_stream_other_seed_other_stream(small_dataset):
    train_dir, _ = small_dataset
    a, b, c = (PackedLoader(train_dir, 16, 2, 2, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        batch_a, batch_b, batch_c = next(a), next(b), next(c)
        assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)
    assert not torch.equal(batch_a["input_ids"], batch_c["input_ids"])


@pytest.mark.parametrize("dp_size,micro", [(2, 2), (4, 1), (2, 4), (8, 1)])
def test_step_rows_do_not_depend_on_data_parallel_size(small_dataset, dp_size, micro):
    train_dir, _ = small_dataset
    G = 8
    reference = PackedLoader(train_dir, 16, G, G, seed=0)
    ranks = [PackedLoader(train_dir, 16, micro, G, d, dp_size, seed=0) for d in range(dp_size)]
    for _ in range(4):
        np.testing.assert_array_equal(step_rows(ranks, G // (dp_size * micro)), full_rows(next(reference)))


@pytest.mark.parametrize("sp_size", [2, 4])
def test_sequence_parallel_ranks_get_contiguous_slices_of_the_same_rows(small_dataset, sp_size):
    train_dir, _ = small_dataset
    T = 32
    reference = PackedLoader(train_dir, T, 3, 6, dp_rank=1, dp_size=2, seed=2)
    ranks = [PackedLoader(train_dir, T, 3, 6, 1, 2, sp_rank=r, sp_size=sp_size, seed=2) for r in range(sp_size)]
    local = T // sp_size
    for _ in range(6):
        full = next(reference)
        parts = [next(loader) for loader in ranks]
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts], dim=1), full[key])
        global_starts = set(full["cu_seqlens"].tolist())
        rebuilt = {0, 3 * T}
        for r, part in enumerate(parts):
            assert part["cu_seqlens"].tolist() == expected_cu_seqlens(part["input_ids"])
            for b in range(3):
                assert part["starts_document"][b] == (r == 0 or full["input_ids"][b, r * local] == EOS)
                rebuilt.update(b * T + r * local + p - b * local for p in part["cu_seqlens"].tolist()
                               if b * local <= p < (b + 1) * local and (p > b * local or part["starts_document"][b]))
        assert rebuilt == global_starts


def test_resume_gives_exactly_the_uninterrupted_batches(small_dataset):
    train_dir, _ = small_dataset
    loader = PackedLoader(train_dir, 16, 2, 4, 1, 2, seed=4)
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # plain and small: counters and seeds
    assert len(json.dumps(state)) < 300
    resumed = PackedLoader(train_dir, 16, 2, 4, 1, 2, seed=123)  # the saved seed wins
    resumed.load_state_dict(state)
    for _ in range(40):  # crosses epoch boundaries
        expected, got = next(loader), next(resumed)
        assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("before,after", [((2, 2), (1, 4)), ((1, 8), (4, 1)), ((4, 2), (2, 1)), ((2, 1), (8, 1))])
def test_resume_at_another_data_parallel_size_continues_the_same_stream(small_dataset, before, after):
    train_dir, _ = small_dataset
    G, steps = 8, 3
    reference = PackedLoader(train_dir, 16, G, G, seed=9)
    expected = [full_rows(next(reference)) for _ in range(2 * steps)]
    dp, micro = before
    ranks = [PackedLoader(train_dir, 16, micro, G, d, dp, seed=9) for d in range(dp)]
    got = [step_rows(ranks, G // (dp * micro)) for _ in range(steps)]
    states = [loader.state_dict() for loader in ranks]
    assert all(s == states[0] for s in states)
    dp, micro = after
    ranks = [PackedLoader(train_dir, 16, micro, G, d, dp, seed=9) for d in range(dp)]
    for loader in ranks:
        loader.load_state_dict(states[0])
    got += [step_rows(ranks, G // (dp * micro)) for _ in range(steps)]
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def test_load_state_dict_refuses_what_it_cannot_resume_exactly(small_dataset, tmp_path):
    train_dir, _ = small_dataset
    loader = PackedLoader(train_dir, 16, 1, 4, seed=0)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(train_dir, 32, 1, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="micro-steps"):
        PackedLoader(train_dir, 16, 2, 4).load_state_dict(state)  # saved in the middle of a 2-row micro-step
    other = make_prepared(tmp_path / "other", [synthetic_docs(30, 5)])
    with pytest.raises(ValueError, match="other training data"):
        PackedLoader(other / "train", 16, 1, 4).load_state_dict(state)


def test_mixture_takes_each_dataset_by_weight_in_its_own_order(tmp_path):
    low = make_prepared(tmp_path / "low", [synthetic_docs(40, s, 10, 500) for s in range(2)])
    high = make_prepared(tmp_path / "high", [synthetic_docs(40, 7, 500, 1000)])
    T, m = 16, 64
    mixture = PackedLoader([(low / "train", 3.0), (high / "train", 1.0)], T, m, m, seed=5)
    rows = np.concatenate([full_rows(next(mixture)) for _ in range(2 * MIX_BLOCK // m)])
    from_low = np.all((rows < 500), axis=1)
    assert np.all(from_low | np.all((rows >= 500) | (rows == EOS), axis=1)), "a row mixes datasets"
    assert from_low[:MIX_BLOCK].sum() == 3 * MIX_BLOCK // 4 and from_low.sum() == 3 * MIX_BLOCK // 2
    alone = PackedLoader(low / "train", T, 1, 1, seed=5)  # dataset 0 of a mixture keeps its own stream
    alone_rows = np.concatenate([full_rows(next(alone)) for _ in range(from_low.sum())])
    np.testing.assert_array_equal(rows[from_low], alone_rows)
    # Resuming in the middle of a mixture block is exact too.
    state = mixture.state_dict()
    resumed = PackedLoader([(low / "train", 3.0), (high / "train", 1.0)], T, m // 2, m, 1, 2)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["input_ids"], next(mixture)["input_ids"][m // 2:])


def test_bad_loader_input_gives_one_clear_error(small_dataset, tmp_path):
    train_dir, _ = small_dataset
    with pytest.raises(ValueError, match="another tokenizer"):
        PackedLoader(train_dir, 16, 1, 1, tokenizer_hash="b" * 64)
    other = make_prepared(tmp_path / "other", [synthetic_docs(10, 1)], tokenizer_hash="c" * 64)
    with pytest.raises(ValueError, match="different tokenizers"):
        PackedLoader([train_dir, other / "train"], 16, 1, 1)
    same_tokenizer = make_prepared(tmp_path / "same", [synthetic_docs(10, 2)])
    with pytest.raises(ValueError, match="gets no rows"):
        PackedLoader([(train_dir, 1.0), (same_tokenizer / "train", 1e-5)], 16, 1, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        PackedLoader(train_dir, 16, 3, 8, 0, 2)
    with pytest.raises(ValueError, match="sequence-parallel"):
        PackedLoader(train_dir, 30, 1, 1, sp_size=4)
    with pytest.raises(ValueError, match="fewer than one row"):
        PackedLoader(train_dir, 100_000, 1, 1)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PackedLoader(tmp_path / "nowhere" / "train", 16, 1, 1)
    with pytest.raises(ValueError, match="pass one split"):
        PackedLoader(train_dir.parent, 16, 1, 1)


def arrays_in_memory(obj, seen: set) -> list[np.ndarray]:
    """Every numpy array reachable from obj's attributes and containers, except memory maps of files."""
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type)):
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        base = obj
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None)
        return [] if base is not None else [obj]
    children = (list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple))
                else list(vars(obj).values()) if hasattr(obj, "__dict__") else [])
    return [a for child in children for a in arrays_in_memory(child, seen)]


def test_loader_memory_grows_with_shards_not_documents(tmp_path):
    docs_per_shard, n_shards = 1000, 10
    root = make_prepared(tmp_path / "many", [synthetic_docs(docs_per_shard, s, max_len=8) for s in range(n_shards)])
    loader = PackedLoader(root / "train", 64, 4, 8, 1, 2, seed=0)
    for _ in range(loader.datasets[0].rows_per_epoch // 8 + 4):  # through every shard, into the next epoch
        next(loader)
    held = arrays_in_memory(loader, set())
    # Per shard: totals (O(shards)); per open shard: document starts and segment ends; the mixture block.
    assert max(a.size for a in held) <= max(docs_per_shard, MIX_BLOCK) < n_shards * docs_per_shard
    assert sum(a.size for a in held) <= 2 * OPEN_SHARDS * docs_per_shard + 2 * MIX_BLOCK + 8 * n_shards
    assert len(loader.datasets[0].open) == OPEN_SHARDS
