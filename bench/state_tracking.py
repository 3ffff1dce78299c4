"""State tracking of each mixer: tiny models trained on a word problem (data=state_tracking: parity by default,
S3, S5), then scored at the training length and at 2x, 4x and 8x it.

Grazzi et al. (2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues") show that a
linear RNN whose transitions have only eigenvalues in [0, 1] cannot track parity at lengths beyond
training, while the delta rule with beta in (0, 2) (reflections: eigenvalue -1) can; Siems et al. (2025)
add Householder products (Gated DeltaProduct) for the permutation groups. Every model here is trained by
train.py itself (the same loop and end-of-run evaluation as any run: data=state_tracking runs the
state_tracking eval task) with the same width, steps and learning rate: two layers of width 64.

The models: every registered recurrent mixer alone, the delta-rule mixers also with allow_neg_eigval (and
any other mixer whose settings have it), and attention. The figure per test length is the accuracy of the
product of all its elements (chance: 1/2 for parity, 1/6 for S3). Writes, into --out, each model's run;
into bench/results/, state_tracking_<date>.json (per model and task: accuracy per length, params, settings)
and state_tracking_<date>.png (accuracy against test length, one panel per task).

    python -m bench.state_tracking                   # every model on parity: 9 minutes on 2 cores (README)
    python -m bench.state_tracking --tasks parity,s3  # and S3: about twice that (none learns S3 in 300 steps)
    python -m bench.state_tracking --quick           # smoke run: parity, three models, 150 steps (about 3 minutes)
    python -m bench.state_tracking --models deltanet_neg,gated_deltaproduct_neg --tasks s3 --steps 1500
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

from bench.common import REPO, print_table, write_results
from checkpoints import load_model
from eval.results import plt, save_figure
from model.config import ModelConfig
from model.registry import MIXERS

# Two layers of width 64, two heads each (the settings of the mixers there are; others keep their defaults).
WIDTH = ["model.d_model=64", "model.n_layers=2", "model.d_ff=128", "model.attention.num_heads=2",
         "model.gla.num_heads=2", "model.mamba2.head_dim=16", "model.mamba2.d_state=16", "model.mlstm.num_heads=2",
         *(f"model.{key}.{setting}" for key in ("gated_deltanet", "deltanet", "gated_deltaproduct")
           for setting in ("num_heads=2", "head_dim=32", "expand_v=1.0"))]


def model_variants() -> dict[str, tuple[str, list[str]]]:
    """name -> (pattern letter, overrides): each recurrent mixer, with "_neg" (allow_neg_eigval) where its
    settings have that switch, then attention."""
    defaults = ModelConfig()
    models = {}
    for mixer in MIXERS.values():
        if not mixer.recurrent:
            continue
        models[mixer.name] = (mixer.letter, [])
        if hasattr(getattr(defaults, mixer.config_key), "allow_neg_eigval"):
            models[f"{mixer.name}_neg"] = (mixer.letter, [f"model.{mixer.config_key}.allow_neg_eigval=true"])
    models["attention"] = (MIXERS["attention"].letter, [])
    return models


MODELS = model_variants()
QUICK_MODELS = ["gla", "gated_deltanet", "deltanet_neg"]


def train_one(name: str, task: str, out: Path, args, threads: int) -> dict:
    letter, overrides = MODELS[name]
    run_dir = out / task / name
    shutil.rmtree(run_dir, ignore_errors=True)
    lengths = [args.seq_len * m for m in args.length_multiples]
    command = [
        sys.executable, str(REPO / "train.py"), "data=state_tracking", f"data.group={task}", f"model.pattern={letter}",
        *WIDTH, *overrides, f"train.seq_len={args.seq_len}", f"train.global_batch_size={args.batch_size}",
        f"train.micro_batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}", f"train.log_every={max(1, args.steps // 4)}", f"optim.lr={args.lr}",
        "optim.warmup_steps=30", "optim.weight_decay=0.0", "logging.wandb.mode=disabled",
        f"eval.state_tracking.lengths=[{','.join(map(str, lengths))}]",
        f"eval.state_tracking.num_examples={args.num_examples}", "eval.batch_size=64", f"run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        sys.exit(f"error: training {name} on {task} failed (exit {proc.returncode}): {last}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"model": name, "pattern": letter, "task": task,
            "params": load_model(run_dir / "checkpoints" / f"step_{args.steps:06d}").num_params(),
            "accuracy": {str(n): results[f"state_tracking_accuracy_{n}"] for n in lengths},
            "final_loss": _final_loss(run_dir), "train_s": round(time.perf_counter() - started, 1)}


def _final_loss(run_dir: Path, last: int = 20) -> float | None:
    """The mean training loss of the last steps (one step's is noisy)."""
    losses = [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None][-last:]
    return sum(losses) / len(losses) if losses else None


def plot(rows: list[dict], tasks: list[str], seq_len: int, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in (r for r in rows if r["task"] == task):
            lengths = [int(n) for n in row["accuracy"]]
            ax.plot(lengths, list(row["accuracy"].values()), marker="o", label=row["model"])
        ax.axvline(seq_len, color="k", ls="--", lw=1)
        ax.axhline(1 / {"parity": 2, "s3": 6, "s5": 120}[task], color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"test length (training: {seq_len}, dashed)")
        ax.set_ylabel("accuracy of the whole product")
        ax.set_title(f"state tracking: {task}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/state_tracking", help="each model's run goes here")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--tasks", default="parity", help="comma-separated, of parity, s3, s5")
    parser.add_argument("--seq-len", type=int, default=64, help="training length")
    parser.add_argument("--length-multiples", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8],
                        help="test lengths as multiples of the training length")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-examples", type=int, default=256, help="sequences scored per test length")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="models trained at once (each on cores / jobs threads)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: parity, {', '.join(QUICK_MODELS)}, 150 steps, 128 sequences, 1x-4x")
    args = parser.parse_args()
    if args.quick:
        args.models = args.models or ",".join(QUICK_MODELS)
        args.tasks, args.steps, args.num_examples, args.length_multiples = "parity", 150, 128, [1, 2, 4]
    names = args.models.split(",") if args.models else list(MODELS)
    tasks = args.tasks.split(",")
    unknown = [n for n in names if n not in MODELS] + [t for t in tasks if t not in ("parity", "s3", "s5")]
    if unknown:
        sys.exit(f"error: unknown {', '.join(unknown)}: models are {', '.join(MODELS)}; tasks parity, s3, s5")
    if args.steps < 1 or args.seq_len < 2 or args.num_examples < 1 or min(args.length_multiples) < 1:
        sys.exit("error: --steps, --num-examples and --length-multiples must be >= 1, --seq-len >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    runs = [(name, task) for task in tasks for name in names]
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:  # each model trains in its own train.py process
        for row in pool.map(lambda run: train_one(*run, out, args, threads), runs):
            rows.append(row)
            print(f"[{len(rows)}/{len(runs)}, {time.perf_counter() - started:.0f} s] {row['task']} {row['model']}: "
                  + ", ".join(f"{n}: {a:.3f}" for n, a in row["accuracy"].items()), flush=True)
    table = [{"task": r["task"], "model": r["model"], "letter": r["pattern"], "params": r["params"],
              **{f"acc@{n}": r["accuracy"][n] for n in r["accuracy"]}, "final loss": r["final_loss"],
              "train s": r["train_s"]} for r in rows]
    print_table(f"state tracking: accuracy of the whole product by test length (trained at {args.seq_len})", table)
    print(f"total {time.perf_counter() - started:.0f} s")
    report = {"machine": f"{os.uname().machine}, {os.cpu_count()} cores, {args.jobs} models at a time",
              "device": "cpu", "command": " ".join(["python -m bench.state_tracking", *sys.argv[1:]]),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "width": WIDTH, "runs": rows}
    path = write_results("state_tracking", report)
    print(f"plot written to {plot(rows, tasks, args.seq_len, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
