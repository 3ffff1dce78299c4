"""Evaluate any saved checkpoint on the held-out split of the data it was trained on.

    python -m eval checkpoint=runs/default/checkpoints/step_000300 [eval.held_out_tokens=...] [other overrides]

The run's config.yaml (two folders up) gives the model and data; overrides on the command line apply on
top. Results go to eval.json beside the checkpoint and are printed. Single process, CPU or GPU.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from configs.schema import typed
from data import prepare_dataset
from eval.perplexity import evaluate_held_out
from model import LM
from parallel.checkpoint import TRAIN_STATE, CheckpointError


def evaluate_checkpoint(checkpoint: Path, overrides: list[str]) -> dict:
    if not (checkpoint / TRAIN_STATE).is_file():
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no {TRAIN_STATE})")
    if not (checkpoint / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint}: no torch.distributed.checkpoint metadata (DeepSpeed checkpoints "
                              "need DeepSpeed's zero_to_fp32 first)")
    run_config = OmegaConf.merge(OmegaConf.load(checkpoint.parent.parent / "config.yaml"),
                                 OmegaConf.from_dotlist(overrides))
    cfg = typed(run_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LM.from_config(cfg.model).to(device)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state["model"])
    dataset = prepare_dataset(cfg.data)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    result = evaluate_held_out(model, dataset.held_out_documents(), dataset.tokenizer.eos_id, cfg.train.seq_len,
                               cfg.eval.batch_size, cfg.eval.held_out_tokens, device, autocast)
    step = json.loads((checkpoint / TRAIN_STATE).read_text())["step"]
    return {"checkpoint": str(checkpoint), "step": step, **result.as_dict()}


def main(argv: list[str]) -> int:
    from train import is_user_error, one_line

    checkpoints = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if len(checkpoints) != 1:
        print("error: usage: python -m eval checkpoint=<run>/checkpoints/step_N [overrides]", file=sys.stderr)
        return 2
    checkpoint = Path(checkpoints[0])
    try:
        results = evaluate_checkpoint(checkpoint, [a for a in argv if not a.startswith("checkpoint=")])
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    (checkpoint / "eval.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
