"""Every checkpoint format, in one place. Models come from model/, which never imports this package; the
engines (parallel/) call down into it to save and load what they hold.

| module | what |
|---|---|
| `checkpointer.py` | training checkpoints: temp dir renamed when complete, keep-last-k, async saves, `train_state.json`, per-rank RNG, the run's `config.yaml` |
| `dcp.py` | torch.distributed.checkpoint (one process, FSDP2): sharded as held, resharded on load |
| `deepspeed.py` | DeepSpeed ZeRO 1/2/3's own files, and their consolidation to one whole model |
| `export.py` | `model.safetensors` + `config.json` (+ the run's config, tokenizer, `export.json`) |
| `load.py` | `load_model(dir)`: an export or any engine's training checkpoint, whole, in one process |
| `safe_load.py` | nothing is ever unpickled: restricted unpickler for DCP metadata, weights-only torch.load |
"""
from checkpoints.checkpointer import RUN_CONFIG, Checkpointer, read_train_state, run_config
from checkpoints.export import check_export_target, is_export, save_export, write_export
from checkpoints.load import load_model

__all__ = ["RUN_CONFIG", "Checkpointer", "check_export_target", "is_export", "load_model", "read_train_state", "run_config",
           "save_export", "write_export"]
