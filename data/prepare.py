"""Prepare tokenized shards from text, jsonl/json/parquet files or a Hugging Face dataset.

    python -m data.prepare source=corpus/ out=data/corpus                        # a directory of text files
    python -m data.prepare source='web/*.jsonl' field=content out=data/web tokenizer.vocab_size=50000
    python -m data.prepare source=HuggingFaceFW/fineweb-edu hf_config=sample-10BT streaming=true out=data/fw
    python -m data.prepare source=docs.parquet out=data/b tokenizer.path=data/web/tokenizer.model
    python -m data.prepare source=docs.parquet out=data/c tokenizer.path=imports/llama/tokenizer.json

Arguments are key=value overrides of PrepareConfig (below; `--help` lists them). The documents are
split into train / held_out by a hash of their text, a sentencepiece tokenizer is trained on a sample of
train (or loaded), and worker processes tokenize consecutive chunks of the stream into one shard each.
Each shard is written to a temporary name and renamed when complete, so an interrupted prepare is
continued by running the same command again (finished shards are kept); on finished output it does
nothing. manifest.json is written last.
"""
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from data.config import option
from data.shards import (FORMAT_VERSION, MANIFEST, RE_PREPARE, SPLITS, TOKENIZER_FILE, atomic_write, build_manifest,
                         read_manifest, shard_name, token_dtype, write_json, write_shard)
from data.sources import FORMATS, DocumentSource
from data.tokenizer import Tokenizer, TokenizerConfig, open_tokenizer, tokenizer_file_name, train_tokenizer

PLAN = "prepare.json"  # the settings of a prepare in progress; replaced by manifest.json when it finishes
LOCK = ".prepare.lock"


@dataclass
class PrepareConfig:
    source: str = option("", "directory, glob or file of text/jsonl/json/parquet, or a Hugging Face dataset "
                             "name or local path")
    out: str = option("", "output directory (created)")
    format: str = option("auto", "auto | " + " | ".join(FORMATS[1:]))
    field: str = option("text", "record field holding the text (jsonl/json/parquet/hf)")
    hf_config: Optional[str] = option(None, "Hugging Face dataset config name")
    hf_split: str = option("train", "Hugging Face dataset split")
    streaming: bool = option(False, "stream the Hugging Face dataset (no full download)")
    held_out_fraction: float = option(0.01, "share of documents held out for evaluation")
    seed: int = option(0, "seed of the held-out split")
    shard_size_tokens: int = option(100_000_000, "about this many tokens per shard")
    workers: int = option(0, "tokenizer processes (0: all cores; 1: this process)")
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: the output directory is required (out=<dir>)")
        if not self.source and self.format != "stdlib":
            raise ValueError("source: what to prepare is required (source=<dir|glob|file|dataset>)")
        if self.format not in FORMATS:
            raise ValueError(f"format: '{self.format}' is not one of {', '.join(FORMATS)}")
        if not 0 <= self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if self.shard_size_tokens < 1 or self.workers < 0:
            raise ValueError("shard_size_tokens must be >= 1 and workers >= 0")

    def settings(self) -> dict:
        """What determines the output (everything but where it goes and how many processes make it)."""
        settings = dataclasses.asdict(self)
        del settings["out"], settings["workers"]
        return settings


def unit_hash(data: bytes, seed: int, salt: bytes) -> float:
    """A uniform number in [0, 1) fixed by the text: the same document always lands in the same split."""
    digest = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little"), salt=salt).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_held_out(data: bytes, cfg: PrepareConfig) -> bool:
    return unit_hash(data, cfg.seed, b"held_out") < cfg.held_out_fraction


def tokenizer_sample(source: Iterable[str], cfg: PrepareConfig) -> Iterator[str]:
    """Train-split documents for the tokenizer: a seeded share of them, up to tokenizer.sample_bytes."""
    taken = 0
    for doc in source:
        data = doc.encode()
        if not doc or is_held_out(data, cfg):
            continue
        if unit_hash(data, cfg.tokenizer.seed, b"tokenizer") >= cfg.tokenizer.sample_fraction:
            continue
        yield doc
        taken += len(data)
        if taken >= cfg.tokenizer.sample_bytes:
            return


def chunks(source: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive runs of documents of about chunk_chars characters: the work (and shard) units."""
    chunk, size = [], 0
    for doc in source:
        if not doc:
            continue
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_worker_tokenizers: dict[str, Tokenizer] = {}


def prepared_tokenizer_path(out: Path) -> Path:
    """The tokenizer file of a prepare in `out`: a given Hugging Face tokenizer.json, else the sentencepiece model."""
    given_hf = out / "tokenizer.json"
    return given_hf if given_hf.is_file() else out / TOKENIZER_FILE


def tokenize_chunk(i: int, docs: list[str], out: Path, cfg: PrepareConfig) -> tuple[int, int]:
    """Tokenize one chunk into train/shard_i and held_out/shard_i (train last: it marks the chunk done)."""
    tokenizer_path = str(prepared_tokenizer_path(out))
    if tokenizer_path not in _worker_tokenizers:
        _worker_tokenizers[tokenizer_path] = open_tokenizer(tokenizer_path)
    tokenizer = _worker_tokenizers[tokenizer_path]
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {split: ([], []) for split in SPLITS}
    for doc, ids in zip(docs, tokenizer.encode_batch(docs)):
        data = doc.encode()
        tokens, n_bytes = splits["held_out" if is_held_out(data, cfg) else "train"]
        tokens.append(np.asarray(ids, dtype))
        n_bytes.append(len(data))
    for split in reversed(SPLITS):
        write_shard(out / split / shard_name(i), *splits[split], dtype, tokenizer.hash)
    return len(docs), sum(len(t) for tokens, _ in splits.values() for t in tokens)


def chunk_done(out: Path, i: int) -> bool:
    return (out / "train" / (shard_name(i) + ".idx")).is_file()


@contextmanager
def locked(out: Path):
    """One prepare per output directory at a time (e.g. every rank of a run preparing the default corpus)."""
    with open(out / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_settings(recorded: dict, settings: dict, path: Path) -> None:
    if recorded != settings:
        changed = sorted(k for k in settings.keys() | recorded.keys() if recorded.get(k) != settings.get(k))
        raise ValueError(f"{path}: this directory was prepared with other settings ({', '.join(changed)} differ); "
                         f"use another out= or the same settings")


def prepare_shards(cfg: PrepareConfig, progress: bool = True) -> Path:
    """Prepare cfg.out (see the module docstring); returns it. Idempotent and resumable."""
    out = Path(cfg.out)
    if (out / MANIFEST).is_file():  # finished: nothing to do (checked before opening the source)
        check_settings(read_manifest(out).get("prepare"), cfg.settings(), out / MANIFEST)
        return out
    documents = DocumentSource(cfg.source, cfg.format, cfg.field, cfg.hf_config, cfg.hf_split, cfg.streaming)
    if next((doc for doc in documents if doc), None) is None:
        raise ValueError(f"{cfg.source}: empty source (no non-empty documents)")
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        if (out / MANIFEST).is_file():  # another process finished it while we waited
            check_settings(read_manifest(out).get("prepare"), cfg.settings(), out / MANIFEST)
            return out
        plan = start_or_continue(out, cfg, documents, progress)
        n_chunks = tokenize_all(out, cfg, documents, plan["chunk_chars"], progress)
        finish(out, cfg, n_chunks)
        (out / PLAN).unlink()
    return out


def start_or_continue(out: Path, cfg: PrepareConfig, documents: DocumentSource, progress: bool) -> dict:
    """The plan of this prepare: its settings, tokenizer and chunk size; made once, then reused on resume."""
    if (out / PLAN).is_file():
        plan = json.loads((out / PLAN).read_text())
        check_settings(plan["prepare"], cfg.settings(), out / PLAN)
        if plan.get("format_version") != FORMAT_VERSION:  # its finished shards are in another format
            raise ValueError(f"{out / PLAN}: an interrupted prepare of format {plan.get('format_version', 1)}, this "
                             f"version writes {FORMAT_VERSION}; {RE_PREPARE} (or delete {out})")
        if plan["source"] != documents.fingerprint():
            raise ValueError(f"{cfg.source}: changed since the interrupted prepare of {out} started "
                             f"(files added, removed or modified); restore it, or delete {out} to start over")
        for tmp in out.rglob(".*.tmp-*"):  # what an interrupted run was writing; never under a final name
            tmp.unlink()
        if "chunk_chars" in plan:
            return plan
    elif any(p.name != LOCK for p in out.iterdir()):
        raise ValueError(f"{out}: exists and is not a prepared dataset (no {MANIFEST} or {PLAN}); "
                         f"use an empty or new out=")
    plan = {"prepare": cfg.settings(), "source": documents.fingerprint(), "format_version": FORMAT_VERSION}
    write_json(out / PLAN, plan)
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
    tokenizer_path = out / TOKENIZER_FILE
    if cfg.tokenizer.path is not None:
        given = open_tokenizer(cfg.tokenizer.path)  # checked before it is copied
        for file in given.files():  # a Hugging Face tokenizer.json comes with its tokenizer_config.json
            name = tokenizer_file_name(file) if file == given.path else file.name
            content = file.read_bytes()
            atomic_write(out / name, lambda f: f.write(content))
        tokenizer = open_tokenizer(out / tokenizer_file_name(given.path))
    else:
        started = time.perf_counter()
        sample = tqdm(tokenizer_sample(documents, cfg), desc="tokenizer sample", unit="doc", disable=not progress,
                      leave=False)
        tokenizer = train_tokenizer(sample, tokenizer_path, cfg.tokenizer)
        if progress:
            print(f"trained a {cfg.tokenizer.model_type} tokenizer, vocab {tokenizer.vocab_size}, "
                  f"in {time.perf_counter() - started:.1f}s")
    # Chunks are cut by characters (known before tokenizing, so they can be cut while reading);
    # this ratio makes a shard about shard_size_tokens tokens.
    probe = list(tokenizer_sample(documents, dataclasses.replace(cfg, tokenizer=dataclasses.replace(
        cfg.tokenizer, sample_bytes=1_000_000))))
    chars_per_token = sum(map(len, probe)) / max(1, sum(map(len, tokenizer.encode_batch(probe))))
    plan["chunk_chars"] = max(1, round(cfg.shard_size_tokens * chars_per_token))
    write_json(out / PLAN, plan)
    return plan


def tokenize_all(out: Path, cfg: PrepareConfig, documents: DocumentSource, chunk_chars: int, progress: bool) -> int:
    """Tokenize every chunk not done yet, in worker processes, with a bounded number in flight; count chunks."""
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=documents.total, desc=f"tokenize {out.name}", unit="doc", disable=not progress)
    tokens, started = 0, time.perf_counter()

    def finished(n_docs: int, n_tokens: int) -> None:
        nonlocal tokens
        tokens += n_tokens
        bar.update(n_docs)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.3g}")

    n_chunks, pending = 0, set()
    # spawn, not fork: the caller may be a training process with threads (torch, gloo) that fork breaks.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else nullcontext() as pool:
        for n_chunks, docs in enumerate(chunks(documents, chunk_chars), 1):
            i = n_chunks - 1
            if chunk_done(out, i):
                bar.update(len(docs))
            elif pool is None:
                finished(*tokenize_chunk(i, docs, out, cfg))
            else:
                if len(pending) >= 2 * workers:  # bounded: the source may be far larger than memory
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finished(*future.result())
                pending.add(pool.submit(tokenize_chunk, i, docs, out, cfg))
        for future in pending:
            finished(*future.result())
    bar.close()
    return n_chunks


def finish(out: Path, cfg: PrepareConfig, n_chunks: int) -> None:
    """Write the manifest (which marks the output complete) once every chunk is done."""
    tokenizer = open_tokenizer(prepared_tokenizer_path(out))
    manifest = build_manifest(out, n_chunks, tokenizer.hash, tokenizer.vocab_size, tokenizer.eos_id, cfg.settings(),
                              tokenizer.path.name)
    if not manifest["splits"]["train"]["num_documents"]:
        raise ValueError(f"{cfg.source}: no training documents (all {manifest['splits']['held_out']['num_documents']} "
                         f"held out)")
    write_json(out / MANIFEST, manifest)


def parse_args(argv: list[str]) -> PrepareConfig:
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(PrepareConfig)  # the class: its defaults, validated only once merged
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(argv))
    return OmegaConf.to_object(merged)


def usage() -> str:
    lines = [__doc__.strip(), "", "Keys (default):"]
    for prefix, schema in (("", PrepareConfig), ("tokenizer.", TokenizerConfig)):
        for f in dataclasses.fields(schema):
            if f.name != "tokenizer":
                lines.append(f"  {prefix + f.name:<30} {f.metadata['help']} ({f.default!r})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = parse_args(argv)
        out = prepare_shards(cfg)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)  # OmegaConf adds lines of context
        return 1
    manifest = read_manifest(out)
    print(f"{out}: " + ", ".join(f"{split} {s['num_tokens']:,} tokens in {s['num_documents']:,} documents"
                                 for split, s in manifest["splits"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
