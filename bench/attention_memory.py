"""Memory autograd keeps for backward in attention models, and how it grows with the sequence length.

One forward of a small model (tiny vocabulary, so the logits do not dominate) under a saved_tensors_hooks
that records the storage of every tensor autograd saves; the sum over distinct storages, parameters left
out (they do not grow with T), is what the backward holds on to. Patterns: A (full attention), W (sliding
window) and GA (a GLA + attention hybrid). Linear memory means x4 tokens -> x4 bytes.
Prints a table and writes JSON (versions, date, config, results) to bench/results/.

    python bench/attention_memory.py                          # T = 2048 and 8192, patterns A, W, GA
    python bench/attention_memory.py --lengths 512 2048 --patterns A --documents 3
"""
import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from model import LM, ModelConfig  # noqa: E402
from model.config import AttentionConfig, GLAConfig  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def saved_bytes(lm: LM, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> int:
    """Bytes of the distinct storages autograd saves in one forward of lm, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lm(input_ids, cu_seqlens=cu_seqlens)
    return sum(storages.values())


def bench_config(pattern: str, n_layers: int, d_model: int, window: int) -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=d_model, d_ff=2 * d_model, pattern=pattern, n_layers=n_layers,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2, window=window),
                       gla=GLAConfig(num_heads=4))


def packed_documents(seq_len: int, documents: int) -> torch.Tensor | None:
    """cu_seqlens of one row cut into `documents` equal documents (None for one)."""
    if documents <= 1:
        return None
    return torch.linspace(0, seq_len, documents + 1).round().to(torch.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--patterns", nargs="+", default=["A", "W", "GA"])
    parser.add_argument("--layers", type=int, default=2, help="n_layers (a multiple of the pattern's length)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--documents", type=int, default=1, help="equal documents packed in the row")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for pattern in args.patterns:
        torch.manual_seed(0)
        lm = LM(bench_config(pattern, args.layers, args.d_model, args.window))
        sizes = []
        for seq_len in args.lengths:
            ids = torch.randint(0, lm.config.vocab_size, (1, seq_len))
            sizes.append(saved_bytes(lm, ids, packed_documents(seq_len, args.documents)))
            results.append(dict(pattern=pattern, seq_len=seq_len, saved_bytes=sizes[-1]))
            print(f"{pattern:>3} T={seq_len:>6}: {sizes[-1] / 2**20:9.1f} MiB saved for backward", flush=True)
        print(f"{pattern:>3} x{args.lengths[-1] / args.lengths[0]:g} tokens -> x{sizes[-1] / sizes[0]:.2f} bytes")

    report = dict(versions=dict(python=platform.python_version(), torch=torch.__version__),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), config=vars(args), results=results)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"attention_memory_{datetime.datetime.now():%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
