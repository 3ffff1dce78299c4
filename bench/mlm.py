"""Encoders on the masked-LM objective: LION-LIT / -D / -S, bidirectional GLA and bidirectional attention.

1. `train`: each tiny encoder (4 layers, d_model 256, the tiny presets) trained by train.py on the stdlib corpus
   with the same steps, batch and settings (train.objective=mlm at --mask-rate), then its end-of-run evaluation:
   held-out MLM accuracy and perplexity at 15% masking (eval task mlm, the whole held-out split), and training
   tokens/s (the median step of metrics.jsonl, steps after the fifth).
2. `lengths`: one forward + backward (the blocks and final norm, the head left out: it is the same for every
   model; batch 1, one document) of the tiny chunkwise LION-S against the tiny bidirectional attention model
   at each --lengths: time (median of
   --repeats) and peak memory (CPU: the largest sum of live tensor storages created during the step, the
   TorchDispatchMode of bench/loss_memory.py; CUDA: max_memory_allocated over what was allocated before).
3. `rnn`: inference (no gradients, the blocks as in 2) of LION-S in its RNN form against its chunkwise and full
   (attention-matrix) forms and bidirectional attention at --rnn-lengths: peak memory and time (the full form up
   to --full-max-length).
Prints tables, writes bench/results/mlm_<date>.json and .png (memory and time against length).

    python -m bench.mlm                                   # everything (about 30-40 min on 2 CPU cores)
    python -m bench.mlm --parts lengths rnn --lengths 512 1024 2048
    python -m bench.mlm --steps 200 --models lion_s bert  # a quicker training comparison
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.common import REPO, RESULTS_DIR, print_table, write_results
from bench.loss_memory import PeakLiveBytes
from checkpoints import load_model
from model import LM

MiB = 2 ** 20
# name -> train.py overrides: the tiny presets (d_model 256, 4 layers); bidirectional GLA is hybrid_tiny's GLA x 4
MODELS = {
    "lion_lit": ["model=lion_lit_tiny"],
    "lion_d": ["model=lion_d_tiny"],
    "lion_s": ["model=lion_s_tiny"],
    "gla_bidirectional": ["model=hybrid_tiny", "model.name=gla_bidirectional_tiny", "model.pattern=G",
                          "model.bidirectional=true"],
    "attention_bidirectional": ["model=bert_tiny"],
}
DATA_VOCAB = 8192  # the embedded corpus's tokenizer; the masked-LM model adds the mask id (8,320 ids)


def train_one(name: str, out: Path, args) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*MODELS[name], f"train.seq_len={args.seq_len}", f"train.global_batch_size={args.batch_size}",
                 f"train.micro_batch_size={args.batch_size}", f"train.max_steps={args.steps}",
                 f"train.checkpoint_every={args.steps}", f"train.log_every={max(args.steps // 10, 1)}",
                 f"optim.lr={args.lr}", f"train.mlm.mask_rate={args.mask_rate}", "eval.mlm.mask_rate=0.15",
                 "logging.wandb.mode=disabled", f"run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        sys.exit(f"error: training {name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 5]
    model = load_model(run_dir / "checkpoints" / f"step_{args.steps:06d}")
    return {"model": name, "params": model.num_params(), "mlm_accuracy": results["mlm_accuracy"],
            "mlm_perplexity": results["mlm_perplexity"], "scored_tokens": results["mlm_scored_tokens"],
            "final_train_loss": records[-1]["loss"] if "loss" in records[-1] else None,
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "train_s": round(time.perf_counter() - started, 1)}


def build(name: str, device: torch.device, form: str = "chunk") -> LM:
    preset = {"lion_lit": "lion_lit_tiny", "lion_d": "lion_d_tiny", "lion_s": "lion_s_tiny",
              "attention_bidirectional": "bert_tiny"}[name]
    cfg = OmegaConf.load(REPO / "configs" / "model" / f"{preset}.yaml")
    cfg.vocab_size, cfg.valid_vocab_size = 8320, DATA_VOCAB
    if "lion" in name:
        cfg.lion.form = form
    torch.manual_seed(0)
    return LM.from_config(cfg).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hidden(lm: LM, ids: torch.Tensor) -> torch.Tensor:
    """The encoder's blocks (embedding, mixers and MLPs, final norm), without the head: what the forms change."""
    x = lm.embed(ids)
    for block in lm.blocks:
        x = block(x)
    return lm.norm(x)


def step(lm: LM, ids: torch.Tensor, grad: bool) -> None:
    if grad:
        lm.zero_grad(set_to_none=True)
        hidden(lm, ids).square().mean().backward()
    else:
        with torch.no_grad():
            hidden(lm, ids)


def measure(lm: LM, length: int, device: torch.device, grad: bool, repeats: int) -> dict:
    """Median seconds of `repeats` steps (after one warm-up) and the peak memory of one."""
    ids = torch.randint(0, DATA_VOCAB, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    step(lm, ids, grad)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step(lm, ids, grad)
        sync(device)
        times.append(time.perf_counter() - start)
    lm.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(lm, ids, grad)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with PeakLiveBytes() as tracker:
            step(lm, ids, grad)
        peak = tracker.peak
    lm.zero_grad(set_to_none=True)
    return {"seconds": statistics.median(times), "peak_mib": peak / MiB}


def lengths_part(args, device) -> list[dict]:
    rows = []
    for name in args.length_models:
        lm = build(name, device)
        for length in args.lengths:
            row = {"model": name, "form": "chunk" if "lion" in name else "sdpa", "length": length,
                   **measure(lm, length, device, grad=True, repeats=args.repeats)}
            rows.append(row)
            print(row, flush=True)
    return rows


def rnn_part(args, device) -> list[dict]:
    rows = []
    for name, form in (("lion_s", "rnn"), ("lion_s", "chunk"), ("lion_s", "full"), ("attention_bidirectional", "sdpa")):
        lm = build(name, device, form).eval()
        for length in args.rnn_lengths:
            if form == "full" and length > args.full_max_length:
                continue
            row = {"model": name, "form": form, "length": length,
                   **measure(lm, length, device, grad=False, repeats=1)}
            rows.append(row)
            print(row, flush=True)
    return rows


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(report.get("lengths"), "seconds", "forward + backward time (s)"),
              (report.get("lengths"), "peak_mib", "forward + backward peak memory (MiB)"),
              (report.get("rnn"), "peak_mib", "inference peak memory (MiB)")]
    panels = [p for p in panels if p[0]]
    if not panels:
        return path
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (rows, key, title) in zip(axes if len(panels) > 1 else [axes], panels):
        for series in dict.fromkeys((r["model"], r["form"]) for r in rows):
            points = [r for r in rows if (r["model"], r["form"]) == series]
            ax.plot([r["length"] for r in points], [r[key] for r in points], marker="o", label=f"{series[0]} ({series[1]})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["train", "lengths", "rnn"], choices=["train", "lengths", "rnn"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)  # LION's MLM recipe
    parser.add_argument("--mask-rate", type=float, default=0.3)  # LION's recipe trains at 0.3 (evaluated at 0.15)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training runs and measurements)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--length-models", nargs="+", default=["lion_s", "attention_bidirectional"],
                        choices=["lion_lit", "lion_d", "lion_s", "attention_bidirectional"])
    parser.add_argument("--rnn-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--full-max-length", type=int, default=4096, help="the full form's O(L^2) matrix stops here")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_mlm", help="the training runs go here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)"}
    if "train" in args.parts:
        report["train"] = [train_one(name, Path(args.out), args) for name in args.models]
        print_table(f"masked LM, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens (mask rate "
                    f"{args.mask_rate}), held-out accuracy at 15%", report["train"])
    if "lengths" in args.parts:
        report["lengths"] = lengths_part(args, device)
        print_table("one forward + backward, batch 1", report["lengths"])
    if "rnn" in args.parts:
        report["rnn"] = rnn_part(args, device)
        print_table("inference (no gradients), batch 1", report["rnn"])
    path = write_results("mlm", report)
    plot(report, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
