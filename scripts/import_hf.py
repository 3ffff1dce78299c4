"""Import a local Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3) as a Baton export.

    python -m scripts.import_hf hf=models/llama-3.2-1b out=imports/llama-3.2-1b
    python train.py init.from=imports/llama-3.2-1b          # continued pretraining, in the model's own ids

Reads config.json, the safetensors weights (one file or shards with their index) and tokenizer.json; writes
out/model.safetensors, config.json, config.yaml (a run config: the stdlib corpus tokenized with the model's
tokenizer), tokenizer.json and export.json (where it came from). An architecture, tensor or setting Baton
cannot reproduce is named in a one-line error and nothing is written (checkpoints/hf/architectures.py).
"""
import sys
from pathlib import Path

from checkpoints.initial import import_export
from configs.errors import run_cli

USAGE = "usage: python -m scripts.import_hf hf=<model dir> out=<dir>"


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if set(args) != {"hf", "out"} or len(argv) != 2:
        print(f"error: {USAGE}", file=sys.stderr)
        return 2

    def run():
        out = import_export(Path(args["hf"]), Path(args["out"]))
        print(f"imported {args['hf']} to {out}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
