"""Export a training checkpoint of any engine to one safetensors file, for evaluation and sharing.

    python -m scripts.export checkpoint=runs/x/checkpoints/step_001000 out=exports/x_1000
    python -m scripts.export checkpoint=runs/x/checkpoints/step_001000 out=exports/x_hf format=hf

format=baton (the default) writes out/model.safetensors, out/config.json (the model), out/config.yaml (the
run's config, so `python -m eval checkpoint=out` scores it on the same data), the tokenizer and out/export.json
(the step and the checkpoint it came from); `checkpoints.load_model(out)` loads it. format=hf writes a
directory `transformers` loads without Baton (checkpoints/hf/exporter.py): a plain Llama / Mistral / Qwen
model for pure attention, Baton's self-contained modeling code (trust_remote_code=True) for anything else (a
masked LM for an encoder).
The checkpoint may also be an export. The export is written to a temporary directory renamed when complete;
an existing non-empty `out` is never overwritten.
"""
import sys
from pathlib import Path

from checkpoints import check_export_target, is_export, load_model, read_train_state, run_config, write_export
from configs.errors import run_cli
from configs.schema import typed
from data import prepare_dataset

USAGE = "usage: python -m scripts.export checkpoint=<run>/checkpoints/step_N out=<dir> [format=baton|hf]"


def export(checkpoint: Path, out: Path, format: str = "baton") -> Path:
    check_export_target(out)  # before the model is read
    config = run_config(checkpoint)
    tokenizer = prepare_dataset(typed(config.copy()).data).tokenizer
    step = None if is_export(checkpoint) else read_train_state(checkpoint)["step"]
    write_export(load_model(checkpoint), out, config, tokenizer,
                 {"step": step, "checkpoint": str(checkpoint.resolve())}, format=format)
    print(f"exported {checkpoint} (step {step}) to {out} ({format})")
    return out


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if not {"checkpoint", "out"} <= set(args) <= {"checkpoint", "out", "format"} or len(argv) != len(args):
        print(f"error: {USAGE}", file=sys.stderr)
        return 2
    return run_cli(lambda: export(Path(args["checkpoint"]), Path(args["out"]), args.get("format", "baton")))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
