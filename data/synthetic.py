"""Synthetic tasks generated on the fly: MQAR (Zoology's multiquery_ar), passkey retrieval text, and state
tracking (parity and permutation word problems).

Every example is a pure function of (seed, example index), so evaluation sets are reproducible and the
training loader (`data=mqar`, `data=passkey`) resumes exactly from the number of rows consumed, like the
packed loader: row q of the stream is example q, whatever the number of ranks.

MQAR, as in Zoology (Arora et al. 2023, zoology/data/associative_recall.py): `num_kv_pairs` key-value
pairs up front (keys from [1, vocab/2), values from [vocab/2, vocab), distinct), then each key queried
once at a gap drawn without replacement from the power law p(g) ~ a g^(a-1), random tokens elsewhere;
only the queried values are labelled. `jrt` repeats the key-value context once more before the queries
("just read twice", Arora et al. 2024).

State tracking (Merrill et al. 2024, "The Illusion of State"; Grazzi et al. 2025): the word problem of a
group G. Each input is an element of G (uniform, independent), each label the product of the inputs so far,
so every position is labelled. G is a symmetric group S_n, its n! elements numbered in the lexicographic
order of their permutation tuples (token i = the i-th permutation, the identity is 0): parity is S_2 (token
1 flips, the label is the running parity), s3 and s5 are S_3 and S_5 (S_5 is the smallest non-solvable
group: no constant-depth circuit of the TC0 class solves its word problem). The product appends on the
right: label_t = x_0 x_1 ... x_t, with (a b)(i) = a(b(i)).
"""
import functools
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from configs.errors import ConfigError, DataError
from data.config import STATE_TRACKING_GROUPS, DataConfig, check_group
from data.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

IGNORE = -100  # labels torch's cross_entropy skips
SYNTHETIC_SOURCES = ("mqar", "passkey", "state_tracking")

# The passkey prompt of Landmark Attention / LongLoRA.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "them. I will quiz you about the important information there. ")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}."
PASSKEY_DIGITS = 5


# --- MQAR --------------------------------------------------------------------------------------------
def check_mqar(vocab_size: int, num_kv_pairs: int, seq_len: int, power_a: float, prefix: str) -> None:
    """Zoology's preconditions, as one-line errors naming the setting."""
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ConfigError(f"{prefix}num_kv_pairs={num_kv_pairs}: need 1 <= 4 x num_kv_pairs <= seq_len={seq_len}")
    if vocab_size < 4 or num_kv_pairs > vocab_size // 2 - 1:
        raise ConfigError(f"{prefix}vocab_size={vocab_size} has fewer than num_kv_pairs={num_kv_pairs} keys "
                         "(keys are [1, vocab/2))")
    if seq_len % 2:
        raise ConfigError(f"{prefix}seq_len={seq_len} must be even (queries sit at even offsets)")
    if not 0 < power_a <= 1:
        raise ConfigError(f"{prefix}power_a must be in (0, 1], got {power_a}")


def mqar_gap_probabilities(space: int, power_a: float) -> np.ndarray:
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    return p / p.sum()


def mqar_example(rng: np.random.Generator, vocab_size: int, num_kv_pairs: int, seq_len: int, power_a: float,
                 jrt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), both [seq_len] (+ 2 x num_kv_pairs with jrt): labels[t] is the value the model must
    predict at input t (a query key), IGNORE elsewhere."""
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=num_kv_pairs, replace=False)
    kvs = np.empty(context, np.int64)
    kvs[0::2], kvs[1::2] = keys, values
    space = (seq_len - context) // 2
    gaps = rng.choice(space, size=num_kv_pairs, replace=False, p=mqar_gap_probabilities(space, power_a))
    queries = np.zeros(seq_len - context, np.int64)
    queries[2 * gaps] = keys
    filler = queries == 0
    queries[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))  # random_non_queries
    prefix = np.concatenate([kvs, kvs]) if jrt else kvs
    inputs = np.concatenate([prefix, queries])
    labels = np.full(len(inputs), IGNORE, np.int64)
    labels[len(prefix) + 2 * gaps] = values
    return inputs, labels


def mqar_set(seed: int, num_examples: int, vocab_size: int, num_kv_pairs: int, seq_len: int, power_a: float,
             jrt: bool = False, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Examples first .. first + num_examples - 1 of the seeded stream, stacked [N, T]."""
    pairs = [mqar_example(np.random.default_rng([seed, first + i]), vocab_size, num_kv_pairs, seq_len, power_a, jrt)
             for i in range(num_examples)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# --- state tracking ----------------------------------------------------------------------------------
@functools.cache
def group_table(group: str) -> np.ndarray:
    """The multiplication table [n!, n!] of the group: table[a, b] = a b (as permutations: a(b(i)))."""
    check_group(group, "state-tracking group")
    perms = list(itertools.permutations(range(STATE_TRACKING_GROUPS[group])))
    index = {perm: i for i, perm in enumerate(perms)}
    return np.array([[index[tuple(a[i] for i in b)] for b in perms] for a in perms], np.int64)


def group_order(group: str) -> int:
    return len(group_table(group))


def state_tracking_example(rng: np.random.Generator, group: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), both [seq_len]: random elements, and the running product of the inputs so far."""
    table = group_table(group)
    inputs = rng.integers(0, len(table), size=seq_len)
    labels = np.empty(seq_len, np.int64)
    product = 0  # the identity
    for t, x in enumerate(inputs):
        product = table[product, x]
        labels[t] = product
    return inputs, labels


def state_tracking_set(seed: int, num_examples: int, group: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples 0 .. num_examples - 1 of the seeded stream at this length, stacked [N, seq_len]."""
    pairs = [state_tracking_example(np.random.default_rng([seed, i]), group, seq_len) for i in range(num_examples)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# --- passkey -----------------------------------------------------------------------------------------
def random_passkey(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS)))


class PasskeyPrompts:
    """The passkey prompt's pieces, tokenized once; prompts are built from their ids so a prompt's length
    is exact: intro + filler x n (needle after round(depth x n) of them) + question."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.intro = tokenizer.encode(PASSKEY_INTRO)
        self.filler = tokenizer.encode(PASSKEY_FILLER)
        self.question = tokenizer.encode(PASSKEY_QUESTION)
        self.needle_len = len(self.needle("0" * PASSKEY_DIGITS))

    def needle(self, key: str) -> list[int]:
        return self.tokenizer.encode(PASSKEY_NEEDLE.format(key=key))

    def answer(self, key: str) -> list[int]:
        return self.tokenizer.encode(PASSKEY_ANSWER.format(key=key))

    def fillers_for(self, length: int) -> int:
        """The most filler sentences whose prompt (one context, no JRT) stays within `length` tokens."""
        fixed = len(self.intro) + self.needle_len + len(self.question)
        return max(0, (length - fixed) // len(self.filler))

    def prompt(self, n_fillers: int, depth: float, key: str, jrt: bool = False) -> list[int]:
        before = round(depth * n_fillers)
        context = self.intro + self.filler * before + self.needle(key) + self.filler * (n_fillers - before)
        return (context * 2 if jrt else context) + self.question


def passkey_answer(generated: str) -> Optional[str]:
    """The key a model's continuation states: the digits it starts with (spaces skipped), else None."""
    digits = generated.lstrip()
    end = next((i for i, c in enumerate(digits) if not c.isdigit()), len(digits))
    return digits[:end] or None


def passkey_correct(generated: str, key: str) -> bool:
    """Exact match: the continuation starts with exactly the key's digits."""
    return passkey_answer(generated) == key


def passkey_tokenizer(cfg: DataConfig) -> Tokenizer:
    """A sentencepiece tokenizer of the passkey text (trained once, cached): the prompt's words are pieces,
    digits single pieces, anything else its bytes."""
    settings = TokenizerConfig(vocab_size=cfg.vocab_size, sample_bytes=10**6)
    key = hashlib.sha256(repr((settings, PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION,
                               PASSKEY_ANSWER)).encode()).hexdigest()[:10]
    path = Path(cfg.cache_dir) / f"passkey-tokenizer-{key}.model"
    if path.is_file():
        return Tokenizer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texts = [PASSKEY_INTRO + PASSKEY_FILLER * 3 + PASSKEY_NEEDLE.format(key=k) + PASSKEY_QUESTION
             + PASSKEY_ANSWER.format(key=k) for k in (random_passkey(rng) for _ in range(200))]
    return train_tokenizer(texts, path, settings)


def passkey_row(rng: np.random.Generator, prompts: PasskeyPrompts, length: int,
                eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One training row of `length` tokens: EOS, a prompt of random size and depth, its answer, EOS;
    padding (EOS) after it is not labelled. Returns (inputs, labels), both [length - 1]."""
    key = random_passkey(rng)
    answer = prompts.answer(key)
    most = prompts.fillers_for(length - len(answer) - 2)
    if most < 1:
        raise ConfigError(f"train.seq_len={length - 1} is too short for a passkey prompt with one filler sentence")
    tokens = [eos_id] + prompts.prompt(int(rng.integers(1, most + 1)), float(rng.random()), key) + answer + [eos_id]
    row = np.full(length, eos_id, np.int64)
    row[:len(tokens)] = tokens
    labels = row[1:].copy()
    labels[len(tokens) - 1:] = IGNORE
    return row[:-1], labels


# --- training data -----------------------------------------------------------------------------------
class SyntheticLoader:
    """Infinite iterator of this rank's micro-batches of generated rows (the packed loader's batch format,
    labels IGNORE where nothing is to be predicted). Rows are laid out over ranks and micro-steps as the
    packed loader lays them (data/loader.py), so the state is the count of rows consumed."""

    STATE_VERSION = 1

    def __init__(self, make_row: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]], fingerprint: str,
                 seq_len: int, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 sp_rank: int = 0, sp_size: int = 1, seed: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(f"global batch {global_batch_size} is not a multiple of micro batch x data-parallel "
                             f"ranks = {micro_batch_size} x {dp_size}")
        if seq_len % sp_size:
            raise ConfigError(f"seq_len {seq_len} is not divisible by the sequence-parallel size {sp_size}")
        self.make_row, self.fingerprint, self.seq_len, self.seed = make_row, fingerprint, seq_len, seed
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.sp_rank, self.sp_size = sp_rank, sp_size
        self.rows_consumed = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch

        m, local = self.micro_batch_size, self.seq_len // self.sp_size
        first = self.rows_consumed + self.dp_rank * m
        self.rows_consumed += self.dp_size * m
        rows = [self.make_row(np.random.default_rng([self.seed, first + b])) for b in range(m)]
        lo = self.sp_rank * local
        inputs = torch.from_numpy(np.stack([r[0] for r in rows])[:, lo:lo + local].copy())
        labels = torch.from_numpy(np.stack([r[1] for r in rows])[:, lo:lo + local].copy())
        return {"input_ids": inputs, "labels": labels,
                "cu_seqlens": torch.arange(0, m * local + 1, local, dtype=torch.int32),
                "starts_document": torch.full((m,), self.sp_rank == 0, dtype=torch.bool)}

    def state_dict(self) -> dict:
        return {"version": self.STATE_VERSION, "rows_consumed": self.rows_consumed, "seed": self.seed,
                "seq_len": self.seq_len, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION or state.get("fingerprint") != self.fingerprint:
            raise DataError("loader state: saved on other training data (another task or task settings)")
        if state["seq_len"] != self.seq_len:
            raise DataError(f"loader state: saved with seq_len {state['seq_len']}, this run has {self.seq_len}")
        if state["rows_consumed"] % (self.micro_batch_size * self.dp_size):
            raise DataError(f"loader state: {state['rows_consumed']} rows consumed is not a whole number of "
                             f"micro-steps of {self.micro_batch_size} x {self.dp_size} rows (save at a step boundary)")
        self.seed, self.rows_consumed = state["seed"], state["rows_consumed"]


@dataclass
class SyntheticData:
    """What `prepare_dataset` returns for data=mqar / passkey / state_tracking: the same questions as PreparedData."""
    cfg: DataConfig
    tokenizer: Optional[Tokenizer]  # None for MQAR and state tracking: their ids are the task's own

    @property
    def vocab_size(self) -> int:
        return group_order(self.cfg.group) if self.cfg.source == "state_tracking" else self.cfg.vocab_size

    def loader(self, seq_len: int, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
               dp_size: int = 1, sp_rank: int = 0, sp_size: int = 1, seed: int = 0) -> SyntheticLoader:
        c = self.cfg
        if c.source == "mqar":
            check_mqar(c.vocab_size, c.num_kv_pairs, seq_len, c.power_a, "data.")
            make_row = lambda rng: mqar_example(rng, c.vocab_size, c.num_kv_pairs, seq_len, c.power_a)  # noqa: E731
            fingerprint = repr(("mqar", c.vocab_size, c.num_kv_pairs, c.power_a))
        elif c.source == "state_tracking":
            make_row = lambda rng: state_tracking_example(rng, c.group, seq_len)  # noqa: E731
            fingerprint = repr(("state_tracking", c.group))
        else:
            prompts = PasskeyPrompts(self.tokenizer)
            make_row = lambda rng: passkey_row(rng, prompts, seq_len + 1, self.tokenizer.eos_id)  # noqa: E731
            make_row(np.random.default_rng(0))  # a seq_len too short fails here, before training starts
            fingerprint = repr(("passkey", self.tokenizer.hash))
        return SyntheticLoader(make_row, fingerprint, seq_len, micro_batch_size, global_batch_size, dp_rank,
                               dp_size, sp_rank, sp_size, seed)

    def held_out_documents(self) -> Iterator[tuple[np.ndarray, int]]:
        """Passkey: 64 generated prompts with their answers (another seed than training's rows)."""
        if self.tokenizer is None:
            raise DataError(f"data={self.cfg.source} has no text: evaluate it with eval.tasks=[{self.cfg.source}]")
        prompts, rng = PasskeyPrompts(self.tokenizer), np.random.default_rng([2**31, 0])
        for _ in range(64):
            key = random_passkey(rng)
            tokens = prompts.prompt(int(rng.integers(1, 40)), float(rng.random()), key) + prompts.answer(key)
            yield np.asarray(tokens, np.int64), len(self.tokenizer.decode(tokens).encode())


def prepare_synthetic(cfg: DataConfig) -> SyntheticData:
    return SyntheticData(cfg, passkey_tokenizer(cfg) if cfg.source == "passkey" else None)
