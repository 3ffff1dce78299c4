"""Token shards on disk: the format, its checks, and reading by memory map.

A prepared dataset directory:
    manifest.json            written last: format version, tokenizer hash, dtype, every shard with its counts and
                             the sha256 of its .bin and of its .idx
    tokenizer.model
    train/shard_00000.bin    token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    train/shard_00000.idx    its index, made to be memory-mapped: 8 bytes INDEX_MAGIC, uint32 format version,
                             uint32 header length, a JSON header (documents, tokens, dtype, tokenizer hash, sha256
                             of the .bin), then little-endian int64 doc_offsets [N+1] into the .bin and int64
                             doc_bytes [N] (UTF-8 bytes of each document, for bits per byte)
    held_out/...             the same
Every file is written to a temporary name and renamed when complete, the .idx after its .bin, so a file
that exists under its final name is complete. Opening a shard reads its index header and checks sizes;
nothing per document is read until a reader maps it, so a run holds O(shards), not O(documents).
"""
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"  # a trained (or given) sentencepiece model; a given HF one: tokenizer.json
SPLITS = ("train", "held_out")
FORMAT_VERSION = 2  # 1: .npz indexes (read whole); 2: memory-mapped indexes, index checksums in the manifest
INDEX_MAGIC = b"BATONIDX"
PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
OFFSET = np.dtype("<i8")
VERIFY_MODES = ("full", "sizes")
RE_PREPARE = "re-run `python -m data.prepare` into a new out= directory"


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


def hashes_here(verify: str) -> bool:
    """data.verify=full: the job's rank 0 (RANK, as torchrun sets it) hashes every shard, the others check sizes;
    data.verify=sizes: no rank hashes."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"data.verify: '{verify}' is not one of {', '.join(VERIFY_MODES)}")
    return verify == "full" and int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class ShardIndex:
    """A shard index's header; its per-document arrays stay on disk until `arrays()` maps them."""
    path: Path
    num_documents: int
    num_tokens: int
    dtype: str
    tokenizer_hash: str
    checksum: str             # sha256 of the .bin
    arrays_at: int            # byte offset of doc_offsets in the file

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(doc_offsets int64 [N+1], doc_bytes int64 [N]) as read-only memory maps of one mapping."""
        n = self.num_documents
        both = np.memmap(self.path, OFFSET, "r", offset=self.arrays_at, shape=(2 * n + 1,))
        return both[:n + 1], both[n + 1:]

    def document_lengths(self) -> np.ndarray:
        """Tokens of every document (int64 [N], in memory: O(one shard)); decreasing offsets are an error."""
        lengths = np.diff(np.asarray(self.arrays()[0]))  # a plain array: the map is released with the view
        if lengths.size and lengths.min() < 0:
            raise ValueError(f"{self.path}: inconsistent shard index (document offsets decrease)")
        return lengths


def write_index(path: Path, doc_offsets: np.ndarray, doc_bytes: np.ndarray, dtype: str, tokenizer_hash: str,
                checksum: str) -> None:
    header = json.dumps({"num_documents": len(doc_bytes), "num_tokens": int(doc_offsets[-1]), "dtype": dtype,
                         "tokenizer_hash": tokenizer_hash, "checksum": checksum}).encode()
    header += b" " * (-(PREAMBLE.size + len(header)) % OFFSET.itemsize)  # the arrays start 8-byte aligned

    def write(f) -> None:
        f.write(PREAMBLE.pack(INDEX_MAGIC, FORMAT_VERSION, len(header)))
        f.write(header)
        f.write(np.ascontiguousarray(doc_offsets, OFFSET).tobytes())
        f.write(np.ascontiguousarray(doc_bytes, OFFSET).tobytes())
    atomic_write(path, write)


def write_shard(stem: Path, documents: list[np.ndarray], doc_bytes: list[int], dtype: np.dtype,
                tokenizer_hash: str) -> None:
    """Write stem.bin (the documents back to back) then stem.idx."""
    tokens = np.concatenate(documents).astype(dtype) if documents else np.zeros(0, dtype)
    offsets = np.zeros(len(documents) + 1, np.int64)
    np.cumsum([len(d) for d in documents], out=offsets[1:])
    data = tokens.tobytes()
    atomic_write(stem.with_suffix(".bin"), lambda f: f.write(data))
    write_index(stem.with_suffix(".idx"), offsets, np.asarray(doc_bytes, np.int64), np.dtype(dtype).name,
                tokenizer_hash, hashlib.sha256(data).hexdigest())


def read_index(path: Path) -> ShardIndex:
    """The header of a shard index, checked against the file's size and its first and last offsets."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shard index not found") from None
    with f:
        preamble = f.read(PREAMBLE.size)
        if preamble.startswith(b"PK\x03\x04"):  # a zip: the .npz of format 1
            raise ValueError(f"{path}: shard index of an older format (1); {RE_PREPARE}")
        if len(preamble) < PREAMBLE.size or not preamble.startswith(INDEX_MAGIC):
            raise ValueError(f"{path}: unreadable shard index (not a shard index file)")
        _, version, header_len = PREAMBLE.unpack(preamble)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: shard index format {version}, this version reads {FORMAT_VERSION}; {RE_PREPARE}")
        try:
            header = json.loads(f.read(header_len))
            index = ShardIndex(path, int(header["num_documents"]), int(header["num_tokens"]), str(header["dtype"]),
                               str(header["tokenizer_hash"]), str(header["checksum"]), PREAMBLE.size + header_len)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: unreadable shard index header ({type(err).__name__}: {err})") from None
        size = os.fstat(f.fileno()).st_size
        if (size != index.arrays_at + (2 * index.num_documents + 1) * OFFSET.itemsize
                or index.dtype not in ("uint16", "uint32")):
            raise ValueError(f"{path}: inconsistent shard index (file size / dtype)")
        first, last = (int.from_bytes(os.pread(f.fileno(), OFFSET.itemsize, index.arrays_at + i * OFFSET.itemsize),
                                      "little", signed=True) for i in (0, index.num_documents))
    if (first, last) != (0, index.num_tokens):
        raise ValueError(f"{path}: inconsistent shard index (document offsets / token count)")
    return index


class Shard:
    """One shard, checked by sizes when opened: its index header, and its tokens mapped on request."""

    def __init__(self, stem: Path, tokenizer_hash: Optional[str] = None):
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

    def check_checksums(self, index_checksum: str, manifest: Path) -> None:
        """Hash both files (~1 GB/s): what a size check cannot see, such as flipped bits."""
        if sha256_file(self.bin_path) != self.index.checksum:
            raise ValueError(f"{self.bin_path}: corrupted (sha256 differs from its index)")
        if sha256_file(self.idx_path) != index_checksum:
            raise ValueError(f"{self.idx_path}: corrupted (sha256 differs from {manifest})")

    def tokens(self) -> np.ndarray:
        """All token ids as a read-only memory map (a fresh one: the caller decides how long it stays open)."""
        if not self.index.num_tokens:
            return np.zeros(0, self.index.dtype)
        return np.memmap(self.bin_path, dtype=self.index.dtype, mode="r")


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: prepared in format {manifest.get('format_version')}, this version reads "
                         f"{FORMAT_VERSION}; {RE_PREPARE}")
    return manifest


def build_manifest(root: Path, n_shards: int, tokenizer_hash: str, vocab_size: int, eos_id: int,
                   settings: dict, tokenizer_file: str = TOKENIZER_FILE) -> dict:
    """The manifest of shards 0..n_shards-1 of every split (empty ones only mark work done, so are left out);
    tokenizer_file names the tokenizer's file in root."""
    splits = {}
    for split in SPLITS:
        shards = []
        for i in range(n_shards):
            path = root / split / (shard_name(i) + ".idx")
            index = read_index(path)
            if index.num_documents:
                shards.append({"name": shard_name(i), "num_tokens": index.num_tokens,
                               "num_documents": index.num_documents, "checksum": index.checksum,
                               "index_checksum": sha256_file(path)})
        splits[split] = {"num_tokens": sum(s["num_tokens"] for s in shards),
                         "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
    return {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_file, "tokenizer_hash": tokenizer_hash,
            "vocab_size": vocab_size, "eos_id": eos_id, "dtype": token_dtype(vocab_size).name,
            "prepare": settings, "splits": splits}


class ShardSet:
    """All shards of one split of a prepared dataset (e.g. <root>/train), checked against the manifest.

    verify: full (sha256 of every file on the job's rank 0, sizes elsewhere) or sizes (see hashes_here)."""

    def __init__(self, split_dir: str | os.PathLike, tokenizer_hash: Optional[str] = None, verify: str = "full"):
        split_dir = Path(split_dir)
        hashing = hashes_here(verify)
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
        self.tokenizer_hash, self.eos_id = manifest["tokenizer_hash"], manifest["eos_id"]
        self.shards = []
        for entry in manifest["splits"][split_dir.name]["shards"]:
            shard = Shard(split_dir / entry["name"], self.tokenizer_hash)
            if (shard.index.checksum != entry["checksum"] or shard.index.num_tokens != entry["num_tokens"]
                    or shard.index.num_documents != entry["num_documents"]):
                raise ValueError(f"{shard.idx_path}: disagrees with {self.root / MANIFEST} (checksum or counts)")
            if hashing:
                shard.check_checksums(entry["index_checksum"], self.root / MANIFEST)
            self.shards.append(shard)
        self.num_tokens = sum(s.index.num_tokens for s in self.shards)
        self.num_documents = sum(s.index.num_documents for s in self.shards)
        # A fingerprint of exactly this data, so a loader state is never resumed on other data.
        self.fingerprint = hashlib.sha256("".join(s.index.checksum for s in self.shards).encode()).hexdigest()

    def documents(self) -> Iterator[tuple[np.ndarray, int]]:
        """Every document in stored order: (token ids as int64, its UTF-8 byte count); one shard mapped at a time."""
        for shard in self.shards:
            tokens, (offsets, doc_bytes) = shard.tokens(), shard.index.arrays()
            lengths = shard.index.document_lengths()
            for start, length, n_bytes in zip(offsets[:-1].tolist(), lengths.tolist(), doc_bytes.tolist()):
                yield tokens[start:start + length].astype(np.int64), n_bytes
