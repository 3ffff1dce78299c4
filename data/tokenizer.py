"""A sentencepiece tokenizer: trained by the project from any document stream, or loaded from a .model file;
or a model's own Hugging Face tokenizer (tokenizer.json, read with `tokenizers`), so that continued pretraining
of an imported model tokenizes with its ids.

The whole text is kept byte for byte (identity normalisation, no dummy prefix, whitespace kept), so
decode(encode(text)) == text for any text, code included: characters outside the vocabulary fall back to
their UTF-8 bytes. The tokenizer's hash (sha256 of the serialised model) is recorded in every shard index,
so data is never read with another tokenizer than the one it was made with.
"""
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from data.config import option

MODEL_TYPES = ("bpe", "unigram")
SENTENCE_CHARS = 4096  # sentencepiece trains on "sentences" of at most this many characters
# The model file records the trainer's thread count; a fixed one keeps the hash the same on every machine.
TRAIN_THREADS = 8


@dataclass
class TokenizerConfig:
    path: Optional[str] = option(None, "use this tokenizer instead of training one: a sentencepiece .model, or a "
                                       "Hugging Face tokenizer.json (with its tokenizer_config.json beside it)")
    model_type: str = option("bpe", "bpe | unigram")
    vocab_size: int = option(32768, "pieces, specials and byte-fallback pieces included")
    byte_fallback: bool = option(True, "unknown characters become their UTF-8 byte pieces, never <unk>")
    split_digits: bool = option(True, "every digit its own piece")
    unk_id: int = option(0, "id of <unk>")
    bos_id: int = option(1, "id of <s> (-1: none)")
    eos_id: int = option(2, "id of </s>, the document separator of packed rows")
    pad_id: int = option(3, "id of <pad> (-1: none)")
    character_coverage: float = option(0.9999, "share of characters given their own piece; the rest use bytes")
    sample_bytes: int = option(200_000_000, "train the tokenizer on at most this much text")
    sample_fraction: float = option(1.0, "share of train-split documents eligible for that sample")
    seed: int = option(0, "picks the sampled documents")

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"tokenizer.model_type: '{self.model_type}' is not one of {', '.join(MODEL_TYPES)}")
        specials = [i for i in (self.unk_id, self.bos_id, self.eos_id, self.pad_id) if i >= 0]
        if self.unk_id < 0 or self.eos_id < 0:
            raise ValueError("tokenizer.unk_id and tokenizer.eos_id must be >= 0 "
                             "(sentencepiece needs unk; packing needs eos)")
        if len(set(specials)) != len(specials):
            raise ValueError(f"tokenizer special ids must differ, got unk/bos/eos/pad = "
                             f"{self.unk_id}/{self.bos_id}/{self.eos_id}/{self.pad_id}")
        min_vocab = max(len(specials) + (256 if self.byte_fallback else 0) + 1, max(specials) + 1)
        if not min_vocab <= self.vocab_size < 2**32:
            raise ValueError(f"tokenizer.vocab_size must be in [{min_vocab}, 2**32), got {self.vocab_size}")
        if not 0 < self.character_coverage <= 1 or not 0 < self.sample_fraction <= 1:
            raise ValueError("tokenizer.character_coverage and tokenizer.sample_fraction must be in (0, 1]")
        if self.sample_bytes < 1:
            raise ValueError(f"tokenizer.sample_bytes must be >= 1, got {self.sample_bytes}")


class Tokenizer:
    """Loaded sentencepiece model. encode/decode plain token id lists; eos_id separates packed documents."""

    def __init__(self, model_path: str | os.PathLike):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: tokenizer model not found")
        self.path = model_path
        proto = model_path.read_bytes()
        self.hash = hashlib.sha256(proto).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as err:
            raise ValueError(f"{model_path}: not a sentencepiece model ({err})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.pad_id = self.sp.pad_id()
        if self.eos_id < 0:
            raise ValueError(f"{model_path}: tokenizer has no EOS piece, which packing needs as the document separator")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def files(self) -> list[Path]:
        return [self.path]

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # beside tokenizer.json: names the special tokens


class HFTokenizer:
    """A Hugging Face tokenizer.json, with the interface of Tokenizer. Its EOS token (the packed documents'
    separator) is the tokenizer_config.json's eos_token beside it; encode adds no special tokens (packing adds
    the separators), decode drops them."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as FastTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        self.path = path
        data = path.read_bytes()
        try:
            self.tok = FastTokenizer.from_str(data.decode())
        except Exception as err:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({err})") from None
        specials = self._special_tokens(path.with_name(HF_TOKENIZER_CONFIG))
        self.eos_id, self.bos_id, self.pad_id = (self._id(specials.get(f"{kind}_token")) for kind in ("eos", "bos", "pad"))
        if self.eos_id < 0:
            raise ValueError(f"{path}: no eos_token in {HF_TOKENIZER_CONFIG} beside it, which packing needs as the "
                             "document separator")
        # The special tokens are part of what the ids mean: two tokenizers differing there are different.
        self.hash = hashlib.sha256(data + repr((self.eos_id, self.bos_id, self.pad_id)).encode()).hexdigest()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _special_tokens(config: Path) -> dict:
        if not config.is_file():
            return {}
        import json

        specials = json.loads(config.read_text())
        return {key: value["content"] if isinstance(value, dict) else value
                for key, value in specials.items() if key.endswith("_token") and value is not None}

    def _id(self, token: Optional[str]) -> int:
        found = None if token is None else self.tok.token_to_id(token)
        return -1 if found is None else found

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def files(self) -> list[Path]:
        """What a copy of this tokenizer needs: tokenizer.json and its config."""
        return [self.path] + [p for p in (self.path.with_name(HF_TOKENIZER_CONFIG),) if p.is_file()]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def open_tokenizer(path: str | os.PathLike) -> "Tokenizer | HFTokenizer":
    """A tokenizer file by its kind: a Hugging Face tokenizer.json, or a sentencepiece model."""
    return HFTokenizer(path) if Path(path).suffix == ".json" else Tokenizer(path)


def tokenizer_file_name(path: str | os.PathLike) -> str:
    """The name a copy of the tokenizer file at `path` takes in a prepared dataset or an export."""
    return "tokenizer.json" if Path(path).suffix == ".json" else "tokenizer.model"


def train_tokenizer(documents: Iterable[str], out_path: str | os.PathLike, cfg: TokenizerConfig) -> Tokenizer:
    """Train on the documents (already sampled) and write out_path atomically. Deterministic given its input."""
    out_path = Path(out_path)
    sentences = list(training_sentences(documents))
    if not sentences:
        raise ValueError(f"{out_path}: no text to train the tokenizer on (empty source)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type=cfg.model_type,
            vocab_size=cfg.vocab_size, byte_fallback=cfg.byte_fallback, split_digits=cfg.split_digits,
            unk_id=cfg.unk_id, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
            character_coverage=cfg.character_coverage, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            max_sentence_length=4 * SENTENCE_CHARS, hard_vocab_limit=True, num_threads=TRAIN_THREADS,
            minloglevel=2)
    except RuntimeError as err:  # e.g. a vocabulary larger than the sample supports
        raise ValueError(f"{out_path}: tokenizer training failed: {err}") from None
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Cut documents into runs of whole lines (newlines kept, so pieces can learn them) of <= SENTENCE_CHARS.

    sentencepiece trains on "sentences" and silently drops long ones; whole documents would be lost.
    """
    for doc in documents:
        run = ""
        for line in doc.splitlines(keepends=True):
            if run and len(run) + len(line) > SENTENCE_CHARS:
                yield run
                run = ""
            run += line[:SENTENCE_CHARS]
        if run:
            yield run
