"""Evaluate any checkpoint on the eval tasks: held-out perplexity and loss by position, passkey, MQAR.

    python -m eval checkpoint=runs/default/checkpoints/step_000560 tasks=[ppl,passkey,mqar] out=DIR \
        [eval.ppl.max_len=2048] [eval.mqar.num_kv_pairs=16] [data.path=...] [any other override]

The run's config (checkpoints.run_config: the run directory's config.yaml, or the one an export
carries) gives the model, data and eval settings; overrides apply on top and are validated like the
training config. `tasks=` is eval.tasks. Writes out/eval.json (default out: the checkpoint directory) and
each task's PNG, prints a summary table. Single process, CPU or GPU. A bad override, an unknown task or a
checkpoint it cannot load: one line and exit 2.
"""
import sys
from pathlib import Path

from omegaconf import OmegaConf

from configs.errors import ConfigError, run_cli
from eval.checkpoint import load_checkpoint
from eval.results import summary_table, write_results
from eval.tasks import evaluate_tasks

USAGE = "usage: python -m eval checkpoint=<checkpoint dir> [tasks=[ppl,passkey,mqar]] [out=<dir>] [overrides]"


def parse_args(argv: list[str]) -> tuple[Path, Path, list[str]]:
    """(checkpoint, out, config overrides) from `key=value` arguments."""
    named, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg}: expected key=value ({USAGE})")
        if key in ("checkpoint", "out"):
            named[key] = value
        elif key == "tasks":
            overrides.append(f"eval.tasks={value if value.startswith('[') else '[' + value + ']'}")
        else:
            overrides.append(arg)
    if "checkpoint" not in named:
        raise ConfigError(f"no checkpoint given ({USAGE})")
    checkpoint = Path(named["checkpoint"])
    return checkpoint, Path(named.get("out", checkpoint)), overrides


def evaluate_checkpoint(checkpoint: Path, out: Path, overrides: list[str], progress: bool = True) -> list:
    loaded = load_checkpoint(checkpoint, overrides)
    results = evaluate_tasks(loaded.cfg, loaded.model, loaded.dataset, loaded.device, loaded.autocast_dtype, progress)
    header = {"checkpoint": str(checkpoint), "step": loaded.step, "params": loaded.model.num_params(),
              "model": OmegaConf.to_container(loaded.raw.model), "data": OmegaConf.to_container(loaded.raw.data)}
    written = write_results(results, out, header)
    print(summary_table(results))
    print("wrote " + ", ".join(str(p) for p in written))
    return results


def main(argv: list[str]) -> int:
    return run_cli(lambda: evaluate_checkpoint(*parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
