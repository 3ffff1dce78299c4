"""Tiny checkpoints for the eval tests, made once per session without training: data=passkey (its
tokenizer trains in milliseconds, its held-out text is generated), a GLA + attention model of d_model 64."""
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from checkpoints import Checkpointer
from configs.schema import load_config
from data import prepare_dataset
from model.config import vocab_for_data
from parallel.engine import Engine, Topology
from parallel.materialize import build_model

REPO = Path(__file__).resolve().parents[2]
TINY = ["data=passkey", "model.vocab_size=8192",  # the passkey tokenizer's: checkpoints are made without data
        "model.d_model=64", "model.pattern=GA", "model.gla.num_heads=2", "model.attention.num_heads=2",
        "train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=2", "logging.wandb.mode=disabled",
        "eval.batch_size=4", "eval.held_out_tokens=600", "eval.ppl.max_documents=3", "eval.ppl.max_len=160",
        "eval.passkey.lengths=[48,96]", "eval.passkey.depths=[0.0,1.0]", "eval.passkey.keys_per_cell=2",
        "eval.mqar.num_examples=8", "eval.mqar.num_kv_pairs=4"]
STEP = 3

# Run by torchrun: the same checkpoint written by two FSDP ranks (gloo on CPU).
FSDP_SAVE = """
import sys
from omegaconf import OmegaConf
from checkpoints import Checkpointer
from configs.schema import load_config
from data import prepare_dataset
from model.config import vocab_for_data
from parallel.build import build_engine
from parallel.topology import init_topology
from data import prepare_dataset
from model.config import vocab_for_data
cfg, raw = load_config(sys.argv[2:])
for key, value in vocab_for_data(cfg.model, prepare_dataset(cfg.data).vocab_size).items():
    setattr(cfg.model, key, value)
    raw.model[key] = value
topo = init_topology(cfg.parallel)
engine = build_engine(cfg, topo)
if topo.is_main:
    (__import__("pathlib").Path(sys.argv[1]) / "config.yaml").write_text(OmegaConf.to_yaml(raw))
checkpointer = Checkpointer(__import__("pathlib").Path(sys.argv[1]) / "checkpoints", 1, async_save=False)
checkpointer.save(%d, engine, {"tokens_seen": 0, "loader": {}, "model_config": OmegaConf.to_container(raw.model)})
checkpointer.wait()
""" % STEP


def tiny_overrides(run_dir: Path) -> list[str]:
    return TINY + [f"run.dir={run_dir}", f"data.cache_dir={REPO / '.cache' / 'data'}"]


def save_tiny_checkpoint(run_dir: Path) -> Path:
    """A one-process checkpoint as train.py writes it (run_dir/config.yaml, checkpoints/step_N)."""
    cfg, raw = load_config(tiny_overrides(run_dir))
    for key, value in vocab_for_data(cfg.model, prepare_dataset(cfg.data).vocab_size).items():  # as train.py does
        setattr(cfg.model, key, value)
        raw.model[key] = value
    engine = Engine(build_model(cfg.model, Topology().device, cfg.run.seed, None), cfg.optim, Topology())
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw))
    checkpointer = Checkpointer(run_dir / "checkpoints", 1, async_save=False)
    path = checkpointer.save(STEP, engine, {"tokens_seen": 0, "loader": {},
                                            "model_config": OmegaConf.to_container(raw.model)})
    checkpointer.wait()
    return path


def save_fsdp_checkpoint(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    script = run_dir / "save.py"
    script.write_text(FSDP_SAVE)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
                           str(run_dir), *tiny_overrides(run_dir), "parallel=fsdp"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / f"step_{STEP:06d}"
