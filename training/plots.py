"""PNG plots of a run, drawn from metrics.jsonl so they can be redrawn for any run directory."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(run_dir: Path, held_out_loss: float | None = None) -> Path:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]  # periodic eval records carry no train loss
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], lw=1, label="train loss")
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
