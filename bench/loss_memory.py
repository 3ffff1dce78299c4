"""Peak memory of the loss: today's `F.cross_entropy(logits.float())` after the head's matmul against the fused,
chunked linear cross-entropy (model/loss.py), forward and backward, at vocabularies of 32K and 128K.

Memory is counted by a TorchDispatchMode that sees every tensor an op returns and keeps a weak reference to
its storage: live bytes are the storages not yet freed, and the peak is their largest sum, the hidden
states, head weight and targets made before it excluded. Both paths run under bf16 autocast as training
does (head matmul in bf16, softmax in fp32), hidden states of the 370M width. The figure of merit is the
peak per token; the fused path also holds d weight [vocab, d_model] in fp32 between forward and backward.
Prints a table and writes JSON (versions, date, config, results) to bench/results/.

    python -m bench.loss_memory                                # 4096 tokens, vocab 32000 and 128256
    python -m bench.loss_memory --tokens 2048 --vocab 32000 --d-model 2048
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.common import write_results
from model.loss import linear_cross_entropy

MiB = 2 ** 20


class PeakLiveBytes(TorchDispatchMode):
    """The largest total of live storages created under this mode (views count their storage once)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {ptr: (ref, size) for ptr, (ref, size) in self.live.items() if not ref.expired()}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def logits_then_cross_entropy(hidden, weight, targets):
    """What train.py did: the whole logits from the head, then cross entropy on their fp32 copy."""
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def measure(loss_fn, tokens: int, vocab: int, d_model: int) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, d_model, requires_grad=True)
    weight = (torch.randn(vocab, d_model) / d_model ** 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens))
    started = time.perf_counter()
    with PeakLiveBytes() as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(hidden, weight, targets)
        forward_peak = tracker.peak
        loss.backward()
    return dict(loss=loss.item(), forward_peak_bytes=forward_peak, peak_bytes=tracker.peak,
                seconds=time.perf_counter() - started, grad_hidden=hidden.grad, grad_weight=weight.grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    print(f"{args.tokens} tokens, d_model {args.d_model}, bf16 autocast; peak live bytes over the inputs:")
    print(f"{'vocab':>7} {'path':>8} {'forward MiB':>12} {'peak MiB':>10} {'bytes/token':>12} {'x vocab':>8} "
          f"{'loss':>8} {'s':>6}")
    for vocab in args.vocab:
        rows = {}
        for path, fn in (("logits", logits_then_cross_entropy), ("fused", linear_cross_entropy)):
            rows[path] = measure(fn, args.tokens, vocab, args.d_model)
            row = rows[path]
            per_token = row["peak_bytes"] / args.tokens
            print(f"{vocab:7d} {path:>8} {row['forward_peak_bytes'] / MiB:12.1f} {row['peak_bytes'] / MiB:10.1f} "
                  f"{per_token:12.0f} {per_token / vocab:8.2f} {row['loss']:8.4f} {row['seconds']:6.1f}", flush=True)
        logits, fused = rows["logits"], rows["fused"]
        grad_error = max(float((fused[name] - logits[name]).norm() / logits[name].norm())
                         for name in ("grad_hidden", "grad_weight"))
        print(f"{vocab:7d}  fused / logits peak: {fused['peak_bytes'] / logits['peak_bytes']:.3f}; loss difference "
              f"{abs(fused['loss'] - logits['loss']):.2e}; gradients' relative difference {grad_error:.2e} (bf16)")
        for path, row in rows.items():
            results.append(dict(vocab=vocab, path=path, tokens=args.tokens, d_model=args.d_model, loss=row["loss"],
                                forward_peak_bytes=row["forward_peak_bytes"], peak_bytes=row["peak_bytes"],
                                seconds=row["seconds"]))

    write_results("loss_memory", dict(config=vars(args), results=results))


if __name__ == "__main__":
    main()
