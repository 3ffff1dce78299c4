"""The masked-LM objective (train.objective=mlm): BERT's masking of the packed rows, for encoders.

Every row of train.seq_len tokens (the loader's rows, documents packed as `EOS doc EOS doc ...` with cu_seqlens)
has exactly round(mask_rate x seq_len) positions scored, chosen uniformly; of those, mask_token are replaced by the
mask id, random_token by a token drawn uniformly from the data's vocabulary, and the rest keep their token
(80/10/10 by default). The label of a scored position is its original token (no next-token shift), every other
label is -100. The choice is a function of (run.seed, the row's global index) alone, so it does not depend on the
data-parallel or sequence-parallel layout, and a resumed run masks exactly as one that never stopped. Because
every row scores the same number of tokens, the step's loss is the mean over all of them: each rank divides its
summed loss by `loss_divisor` (micro-batch rows x scored per row / sp ranks), which the engines' gradient average
turns into the global mean however the rows and their slices are spread (train.py compute_loss).

The mask id is the first id past the data's vocabulary (`mlm_vocab`): the model's vocabulary has room for it, and
like any padding id its logit is -inf, so it is never predicted.
"""
from dataclasses import dataclass

import numpy as np
import torch

from configs.errors import ConfigError

MLM_STREAM = 0x4D4C4D  # keeps the masks' random stream apart from the loader's (same run seed)


@dataclass
class MLMConfig:
    mask_rate: float = 0.15    # share of every row's positions scored (LION's recipe trains at 0.3, evaluates at 0.15)
    mask_token: float = 0.8    # of the scored positions: replaced by the mask id
    random_token: float = 0.1  # replaced by a random token (the rest keep their own)

    def __post_init__(self):
        if not 0 < self.mask_rate < 1:
            raise ConfigError(f"train.mlm.mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.mask_token < 0 or self.random_token < 0 or self.mask_token + self.random_token > 1:
            raise ConfigError("train.mlm: mask_token and random_token must be >= 0 and sum to at most 1, got "
                              f"{self.mask_token} and {self.random_token}")


def scored_per_row(seq_len: int, mask_rate: float) -> int:
    return max(1, round(mask_rate * seq_len))


def mlm_vocab(model_cfg, data_vocab_size: int) -> dict:
    """model.vocab_size / valid_vocab_size for MLM on data of data_vocab_size ids: room for the mask id
    (= data_vocab_size), which is padding (never predicted)."""
    from model.config import vocab_for_data

    if model_cfg.vocab_size is not None and model_cfg.vocab_size <= data_vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} leaves no id for the mask token: masked-LM "
                          f"training needs at least the data's {data_vocab_size} + 1 (leave it null to follow the data)")
    vocab = vocab_for_data(model_cfg, data_vocab_size + 1)["vocab_size"]
    return {"vocab_size": vocab, "valid_vocab_size": data_vocab_size}


def row_masking(row: int, seed: int, seq_len: int, cfg: MLMConfig, vocab_size: int):
    """(scored positions [k] of the row, what each becomes: 0 the mask id, 1 a random token, 2 itself, the random
    tokens [k]); a function of (seed, row) alone."""
    rng = np.random.default_rng([seed, MLM_STREAM, row])
    k = scored_per_row(seq_len, cfg.mask_rate)
    positions = rng.permutation(seq_len)[:k]
    u = rng.random(k)
    kind = np.where(u < cfg.mask_token, 0, np.where(u < cfg.mask_token + cfg.random_token, 1, 2))
    return positions, kind, rng.integers(0, vocab_size, k)


def mask_tokens(tokens: np.ndarray, rows: list[int], offset: int, seq_len: int, seed: int, cfg: MLMConfig,
                mask_id: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) [B, T] of token slices [B, T] that start at position `offset` of rows `rows` (global
    indices) of seq_len tokens."""
    inputs, labels = tokens.copy(), np.full(tokens.shape, -100, dtype=np.int64)
    for b, row in enumerate(rows):
        positions, kind, random_ids = row_masking(row, seed, seq_len, cfg, vocab_size)
        here = (positions >= offset) & (positions < offset + tokens.shape[1])
        positions, kind, random_ids = positions[here] - offset, kind[here], random_ids[here]
        labels[b, positions] = tokens[b, positions]
        inputs[b, positions[kind == 0]] = mask_id
        inputs[b, positions[kind == 1]] = random_ids[kind == 1]
    return inputs, labels


class MaskedLoader:
    """A packed loader's rows, masked: the same rows, state_dict and resume (the wrapped loader's); input_ids
    masked, labels the scored tokens, `loss_divisor` for the step's global mean."""

    def __init__(self, loader, cfg: MLMConfig, mask_id: int, vocab_size: int, seed: int):
        self.loader, self.cfg, self.mask_id, self.vocab_size, self.seed = loader, cfg, mask_id, vocab_size, seed

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        loader = self.loader
        first = loader.rows_consumed + loader.dp_rank * loader.micro_batch_size  # as PackedLoader.__next__ reads
        batch = next(loader)
        rows, local = batch["input_ids"].shape
        inputs, labels = mask_tokens(batch["input_ids"].numpy(), list(range(first, first + rows)),
                                     loader.sp_rank * local, loader.seq_len, self.seed, self.cfg, self.mask_id,
                                     self.vocab_size)
        divisor = rows * scored_per_row(loader.seq_len, self.cfg.mask_rate) / loader.sp_size
        return {**batch, "input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "loss_divisor": torch.tensor(divisor, dtype=torch.float32)}

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
