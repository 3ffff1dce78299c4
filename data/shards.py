"""Token shards on disk: the format, its checks, and reading by memory map.

A prepared dataset directory:
    manifest.json            written last: tokenizer hash, dtype, every shard with its counts and checksum
    tokenizer.model
    train/shard_00000.bin    token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    train/shard_00000.idx    its index (a .npz, read without pickle): doc_offsets [N+1] into the .bin,
                             doc_bytes [N] (UTF-8 bytes of each document, for bits per byte), dtype,
                             tokenizer hash, sha256 of the .bin
    held_out/...             the same
Every file is written to a temporary name and renamed when complete, the .idx after its .bin, so a file
that exists under its final name is complete.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "held_out")
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: Path, write) -> None:
    """write(file) to a temporary sibling, then rename: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


@dataclass
class ShardIndex:
    doc_offsets: np.ndarray   # int64 [N+1]
    doc_bytes: np.ndarray     # int64 [N]
    dtype: str
    tokenizer_hash: str
    checksum: str             # sha256 of the .bin

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def num_documents(self) -> int:
        return len(self.doc_bytes)


def write_shard(stem: Path, documents: list[np.ndarray], doc_bytes: list[int], dtype: np.dtype,
                tokenizer_hash: str) -> ShardIndex:
    """Write stem.bin (the documents back to back) then stem.idx."""
    tokens = np.concatenate(documents).astype(dtype) if documents else np.zeros(0, dtype)
    offsets = np.zeros(len(documents) + 1, np.int64)
    np.cumsum([len(d) for d in documents], out=offsets[1:])
    data = tokens.tobytes()
    atomic_write(stem.with_suffix(".bin"), lambda f: f.write(data))
    index = ShardIndex(offsets, np.asarray(doc_bytes, np.int64), np.dtype(dtype).name, tokenizer_hash,
                       hashlib.sha256(data).hexdigest())
    atomic_write(stem.with_suffix(".idx"), lambda f: np.savez(
        f, doc_offsets=index.doc_offsets, doc_bytes=index.doc_bytes, dtype=np.str_(index.dtype),
        tokenizer_hash=np.str_(index.tokenizer_hash), checksum=np.str_(index.checksum)))
    return index


def read_index(path: Path) -> ShardIndex:
    try:
        with np.load(path, allow_pickle=False) as z:
            index = ShardIndex(z["doc_offsets"].astype(np.int64), z["doc_bytes"].astype(np.int64), str(z["dtype"]),
                               str(z["tokenizer_hash"]), str(z["checksum"]))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shard index not found") from None
    except Exception as err:
        raise ValueError(f"{path}: unreadable shard index ({type(err).__name__}: {err})") from None
    offsets = index.doc_offsets
    if (len(offsets) != index.num_documents + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0)
            or index.dtype not in ("uint16", "uint32")):
        raise ValueError(f"{path}: inconsistent shard index (document offsets / byte counts / dtype)")
    return index


class Shard:
    """One checked shard: its index and its tokens as a read-only memory map."""

    def __init__(self, stem: Path, tokenizer_hash: Optional[str] = None, verify_checksum: bool = True):
        self.bin_path, self.idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
        self.index = read_index(self.idx_path)
        if tokenizer_hash is not None and self.index.tokenizer_hash != tokenizer_hash:
            raise ValueError(f"{self.bin_path}: made with another tokenizer (hash {self.index.tokenizer_hash[:12]}, "
                             f"this run's is {tokenizer_hash[:12]})")
        if not self.bin_path.is_file():
            raise FileNotFoundError(f"{self.bin_path}: shard file missing (its index exists)")
        itemsize = np.dtype(self.index.dtype).itemsize
        size = self.bin_path.stat().st_size
        if size != self.index.num_tokens * itemsize:
            problem = "truncated" if size < self.index.num_tokens * itemsize else "longer than its index says"
            raise ValueError(f"{self.bin_path}: {problem} ({size} bytes, index says "
                             f"{self.index.num_tokens} x {itemsize})")
        if verify_checksum and sha256_file(self.bin_path) != self.index.checksum:
            raise ValueError(f"{self.bin_path}: corrupted (sha256 differs from its index)")
        self.tokens = (np.memmap(self.bin_path, dtype=self.index.dtype, mode="r") if size
                       else np.zeros(0, self.index.dtype))

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.index.doc_offsets[i]:self.index.doc_offsets[i + 1]]


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found: {root} is not a prepared dataset, or its prepare did not finish "
                                f"(re-run `python -m data.prepare` to complete it)")
    try:
        manifest = json.loads(path.read_text())
        manifest["splits"], manifest["tokenizer_hash"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from None
    return manifest


def build_manifest(root: Path, n_shards: int, tokenizer_hash: str, vocab_size: int, eos_id: int,
                   settings: dict) -> dict:
    """The manifest of shards 0..n_shards-1 of every split (empty ones only mark work done, so are left out)."""
    splits = {}
    for split in SPLITS:
        shards = []
        for i in range(n_shards):
            index = read_index(root / split / (shard_name(i) + ".idx"))
            if index.num_documents:
                shards.append({"name": shard_name(i), "num_tokens": index.num_tokens,
                               "num_documents": index.num_documents, "checksum": index.checksum})
        splits[split] = {"num_tokens": sum(s["num_tokens"] for s in shards),
                         "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
    return {"format_version": FORMAT_VERSION, "tokenizer": TOKENIZER_FILE, "tokenizer_hash": tokenizer_hash,
            "vocab_size": vocab_size, "eos_id": eos_id, "dtype": token_dtype(vocab_size).name,
            "prepare": settings, "splits": splits}


class ShardSet:
    """All shards of one split of a prepared dataset (e.g. <root>/train), checked against the manifest."""

    def __init__(self, split_dir: str | os.PathLike, tokenizer_hash: Optional[str] = None,
                 verify_checksums: bool = True):
        split_dir = Path(split_dir)
        if (split_dir / MANIFEST).is_file():
            raise ValueError(f"{split_dir}: is a prepared dataset root; pass one split: {split_dir / 'train'} "
                             f"or {split_dir / 'held_out'}")
        self.dir, self.root = split_dir, split_dir.parent
        manifest = read_manifest(self.root)
        if split_dir.name not in manifest["splits"]:
            raise ValueError(f"{self.root / MANIFEST}: has no split '{split_dir.name}'")
        if tokenizer_hash is not None and manifest["tokenizer_hash"] != tokenizer_hash:
            raise ValueError(f"{self.root}: prepared with another tokenizer (hash {manifest['tokenizer_hash'][:12]}, "
                             f"this run's is {tokenizer_hash[:12]})")
        self.tokenizer_hash = manifest["tokenizer_hash"]
        self.shards = []
        for entry in manifest["splits"][split_dir.name]["shards"]:
            shard = Shard(split_dir / entry["name"], self.tokenizer_hash, verify_checksums)
            if (shard.index.checksum != entry["checksum"] or shard.index.num_tokens != entry["num_tokens"]
                    or shard.index.num_documents != entry["num_documents"]):
                raise ValueError(f"{shard.idx_path}: disagrees with {self.root / MANIFEST} (checksum or counts)")
            self.shards.append(shard)
        self.num_tokens = sum(s.index.num_tokens for s in self.shards)
        self.num_documents = sum(s.index.num_documents for s in self.shards)
        # A fingerprint of exactly this data, so a loader state is never resumed on other data.
        self.fingerprint = hashlib.sha256("".join(s.index.checksum for s in self.shards).encode()).hexdigest()

    def documents(self) -> Iterator[tuple[np.ndarray, int]]:
        """Every document in stored order: (token ids as int64, its UTF-8 byte count)."""
        for shard in self.shards:
            for i in range(shard.index.num_documents):
                yield shard.document(i).astype(np.int64), int(shard.index.doc_bytes[i])
