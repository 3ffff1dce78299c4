"""Associative recall (MQAR) of each mixer: tiny 2-layer models trained on data=mqar, then evaluated.

Each model is trained by train.py itself (the same loop, checkpoints and end-of-run evaluation as any
run; data=mqar runs the mqar eval task at the end) with the same width, steps and learning rate, and
evaluated on held-out MQAR examples (another seed than the training rows). The table lists each
model's recurrent state per sequence (recurrent and conv states, or the KV cache at seq_len, in floats):
Zoology (Arora et al. 2023) and Gated DeltaNet (Yang et al. 2024) order recall against state size.
Writes, into --out: each model's run (checkpoints/step_N) and recall_<date>.json (per model: name,
accuracy, checkpoint, vocab_size, num_kv_pairs, seq_len, power_a, ...), copied to bench/results/.

    python -m bench.recall                                   # A, G, M, D and GA at the default settings
    python -m bench.recall --out runs/recall --models A,GA --steps 1000 --num-kv-pairs 4

The default (3000 steps of 64 rows, vocabulary 256, 8 pairs, seq_len 64) is what attention needs to solve
MQAR here: its loss plateaus for about 1,500 steps, then drops to near zero within a few hundred (the
induction step the Zoology paper describes); 2,000 steps stop mid-drop (about 0.3 accuracy). The models
train two at a time, one thread each (--jobs), which on 2 cores is faster than one at a time on both.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RESULTS_DIR, write_results
from checkpoints import load_model
from model import LM
from model.registry import MIXERS

REPO = Path(__file__).resolve().parents[1]
# Every registered mixer alone (by pattern letter), and the GLA + attention hybrid.
MODELS = {mixer.letter: mixer.name for mixer in MIXERS.values()} | {"GA": "gla+attention"}
DEFAULT_MODELS = ["A", "G", "M", "D", "GA"]  # a sliding window at seq_len 64 is full attention
# Two layers of width 64, two heads each: the Zoology scale.
WIDTH = ["model.d_model=64", "model.n_layers=2", "model.attention.num_heads=2", "model.gla.num_heads=2",
         "model.mamba2.head_dim=16", "model.mamba2.d_state=16", "model.gated_deltanet.num_heads=2",
         "model.gated_deltanet.head_dim=16"]


def state_floats(model: LM, seq_len: int) -> int:
    """Floats a sequence carries after seq_len tokens: recurrent and conv states, KV caches."""
    return model.init_state(1, seq_len).numel()


def train_one(pattern: str, out: Path, args, threads: int) -> dict:
    run_dir = out / MODELS[pattern].replace("+", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        "data=mqar", f"data.vocab_size={args.vocab_size}", f"data.num_kv_pairs={args.num_kv_pairs}",
        f"data.power_a={args.power_a}", f"model.pattern={pattern}", *WIDTH, f"train.seq_len={args.seq_len}",
        f"train.global_batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.log_every={args.steps // 4}",
        f"optim.lr={args.lr}", "optim.warmup_steps=30", "optim.weight_decay=0.0", "logging.wandb.mode=disabled",
        f"eval.mqar.num_examples={args.num_examples}", "eval.mqar.seed=1", f"run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        sys.exit(f"error: training {MODELS[pattern]} failed (exit {proc.returncode}): "
                 f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    train_s = time.perf_counter() - started
    results = json.loads((run_dir / "results.json").read_text())
    checkpoint = run_dir / "checkpoints" / f"step_{args.steps:06d}"
    model = load_model(checkpoint)
    return {"name": MODELS[pattern], "pattern": pattern * (2 // len(pattern)), "accuracy": results["mqar_accuracy"],
            "checkpoint": str(checkpoint), "vocab_size": args.vocab_size, "num_kv_pairs": args.num_kv_pairs,
            "seq_len": args.seq_len, "power_a": args.power_a, "params": model.num_params(),
            "state_floats": state_floats(model, args.seq_len), "train_s": round(train_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/recall", help="runs (checkpoints) and recall_<date>.json go here")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--num-kv-pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--power-a", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-examples", type=int, default=512, help="held-out MQAR examples scored per model")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="models trained at once (each on cores / jobs threads)")
    args = parser.parse_args()
    patterns = args.models.split(",")
    unknown = [p for p in patterns if p not in MODELS]
    if unknown:
        sys.exit(f"error: --models: {', '.join(unknown)} not among {', '.join(MODELS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    print(f"{'model':<16} {'layers':<7} {'params':>8} {'state floats':>13} {'accuracy':>9} {'train s':>8}")
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:  # each model trains in its own train.py process
        for row in pool.map(lambda pattern: train_one(pattern, out, args, threads), patterns):
            rows.append(row)
            print(f"{row['name']:<16} {row['pattern']:<7} {row['params']:>8} {row['state_floats']:>13} "
                  f"{row['accuracy']:>9.3f} {row['train_s']:>8.0f}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    report = {"machine": f"{os.uname().machine}, {os.cpu_count()} cores, {args.jobs} models at a time", "device": "cpu",
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "models")}, "models": rows}
    path = write_results("recall", report, directory=out)
    shutil.copy(path, RESULTS_DIR / path.name)
    print(f"copied to {RESULTS_DIR / path.name}")


if __name__ == "__main__":
    main()
