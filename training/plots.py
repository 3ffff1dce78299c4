"""PNG plots of a run, drawn from metrics.jsonl so they can be redrawn for any run directory."""
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing); non-finite values skipped."""
    out, average, count = [], 0.0, 0
    for value in values:
        if math.isfinite(value):
            average, count = weight * average + (1 - weight) * value, count + 1
        out.append(average / (1 - weight**count) if count else math.nan)
    return out


def plot_loss_curve(run_dir: Path, held_out_loss: float | None = None) -> Path:
    """loss_curve.png: raw and smoothed train loss (redrawn as the run goes), the held-out loss at the end."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]  # periodic eval records carry no train loss
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="train loss")
    ax.plot(steps, smoothed(losses), lw=1.6, color="C0", label="train loss (smoothed)")
    if held_out_loss is not None:
        ax.axhline(held_out_loss, color="C1", ls="--", lw=1, label=f"held-out loss {held_out_loss:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
