"""Export a training checkpoint of any engine to one safetensors file, for evaluation and sharing.

    python -m scripts.export checkpoint=runs/x/checkpoints/step_001000 out=exports/x_1000

Writes out/model.safetensors, out/config.json (the model), out/config.yaml (the run's config, so
`python -m eval checkpoint=out` scores it on the same data), out/tokenizer.model and out/export.json
(the step and the checkpoint it came from). `LM.from_checkpoint(out)` loads it. The export is written to
a temporary directory renamed when complete; an existing non-empty `out` is never overwritten.
"""
import json
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from configs.errors import ConfigError, run_cli
from configs.schema import typed
from data import prepare_dataset
from model import LM
from parallel.checkpoint import RUN_CONFIG, read_train_state, run_config

USAGE = "usage: python -m scripts.export checkpoint=<run>/checkpoints/step_N out=<dir>"


def export(checkpoint: Path, out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose another out=")
    model = LM.from_checkpoint(checkpoint)
    config = run_config(checkpoint)
    tokenizer = prepare_dataset(typed(config.copy()).data).tokenizer
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / RUN_CONFIG).write_text(OmegaConf.to_yaml(config))
    shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
    step = read_train_state(checkpoint)["step"]
    (tmp / "export.json").write_text(json.dumps({"step": step, "checkpoint": str(checkpoint.resolve())}, indent=1))
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    print(f"exported {checkpoint} (step {step}) to {out}")
    return out


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if set(args) != {"checkpoint", "out"} or len(argv) != 2:
        print(f"error: {USAGE}", file=sys.stderr)
        return 2
    return run_cli(lambda: export(Path(args["checkpoint"]), Path(args["out"])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
