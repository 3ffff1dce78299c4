"""Train a recurrent or hybrid language model, then evaluate it.

    python train.py                                     # the embedded default (what `make train` runs)
    python train.py model=transformer_tiny train.max_steps=50 run.dir=runs/x
    torchrun --nproc_per_node=8 train.py parallel=fsdp parallel.sp=2 ...
    python train.py run.dir=runs/x resume=auto          # continue from the newest complete checkpoint

Configs: configs/ (Hydra). Models: model/. Data: data/. Sharding and sequence parallelism:
parallel/. Checkpoints: checkpoints/. Evaluation: eval/. Signals, bad steps and exit codes: training/faults.py.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from checkpoints import Checkpointer
from configs.errors import ConfigError, run_cli
from configs.schema import load_config
from data import prepare_dataset
from eval import run_tasks
from model.config import vocab_for_data
from parallel.build import build_engine
from parallel.topology import init_topology
from training.faults import (EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_TIMEOUT, StepGuard, StopSignals, TrainingDiverged,
                             describe_timeout)
from training.metrics import MetricsLogger, StepTimer, console_line, truncate_metrics
from training.optim import lr_at
from training.plots import plot_loss_curve
from training.profile import StepProfiler


def train(cfg, raw_cfg, stop: StopSignals) -> int:
    topo = init_topology(cfg.parallel)
    run_dir = Path(cfg.run.dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    resume_from = resolve_resume(cfg.resume, checkpointer)
    micro_batch = resolve_micro_batch(cfg, raw_cfg, topo)
    torch.manual_seed(cfg.run.seed)

    dataset = prepare_dataset(cfg.data)
    for key, value in vocab_for_data(cfg.model, dataset.vocab_size).items():  # null: the data's, rounded up
        setattr(cfg.model, key, value)
        raw_cfg.model[key] = value  # so config.yaml and the checkpoints' model config rebuild this model
    engine = build_engine(cfg, topo)  # builds the model, sharded as the engine holds it
    loader = dataset.loader(cfg.train.seq_len, micro_batch, cfg.train.global_batch_size, topo.dp_rank, topo.dp_size,
                            topo.sp_rank, topo.sp_size, seed=cfg.run.seed)
    micro_per_step = cfg.train.global_batch_size // (micro_batch * topo.dp_size)  # the loader checked it
    autocast_dtype = autocast_dtype_for(cfg.train.dtype, topo.device)
    model_config = OmegaConf.to_container(raw_cfg.model)

    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = checkpointer.load(resume_from, engine, model_config)
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        if topo.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
            print(f"resumed from {resume_from} at step {step}")
    if topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw_cfg))
    logger = MetricsLogger(run_dir, cfg.logging.wandb, OmegaConf.to_container(raw_cfg), enabled=topo.is_main)

    def save(at_step: int) -> None:
        checkpointer.save(at_step, engine, {"tokens_seen": tokens_seen, "loader": loader.state_dict(),
                                            "model_config": model_config})

    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    timer = StepTimer(engine.model.flops_per_token(cfg.train.seq_len), topo.device, topo.world_size)
    guard = StepGuard(cfg.train.max_bad_steps, cfg.train.spike_factor)
    profiler = StepProfiler(cfg.train.profile.steps, run_dir / "profile", topo.rank)
    progress = tqdm(total=cfg.train.max_steps, initial=step, desc="train", disable=not topo.is_main)
    engine.model.train()
    while step < cfg.train.max_steps:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=topo.device)
        for _ in range(micro_per_step):
            batch = {k: v.to(topo.device) for k, v in next(loader).items()}
            with torch.autocast(topo.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = engine.model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"],
                                      sp=engine.sequence_parallel(batch))
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten()) / micro_per_step
            engine.backward(loss)
            loss_sum += loss.detach()
        lr = lr_at(step, cfg.train.max_steps, cfg.optim)
        grad_norm = engine.step(lr)  # a non-finite gradient norm: the update is skipped
        loss_mean, stop_requested = engine.reduce_step(loss_sum.item(), stop.received is not None)
        step += 1
        tokens_seen += tokens_per_step
        profiler.step(step)
        record = {"step": step, "loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                  **timer.step(time.perf_counter() - started, tokens_per_step, cfg.train.max_steps - step),
                  **guard.check(step, loss_mean, grad_norm)}
        logger.log(record)
        guard.raise_if_diverged()
        logger.log(checkpointer.poll())  # a save finished in the background: when, and what it cost the loop
        progress.update(1)
        if step % cfg.train.log_every == 0 and topo.is_main:
            progress.write(console_line(record, cfg.train.max_steps))
            plot_loss_curve(run_dir)
        periodic = cfg.train.checkpoint_every and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps)
        if periodic or stop_requested:
            save(step)
        if stop_requested:
            logger.log(checkpointer.wait())
            progress.close()
            logger.close()
            if topo.is_main:
                print(f"stopped by {stop.received or 'a signal to another rank'} at step {step}; checkpoint "
                      f"saved, resume=auto continues (exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            logger.log({"step": step, **evaluate(cfg, engine.model, dataset, topo, autocast_dtype)})
    logger.log(checkpointer.wait())
    progress.close()

    figures = evaluate(cfg, engine.model, dataset, topo, autocast_dtype, plot_dir=run_dir)
    results = {"step": step, "tokens_seen": tokens_seen, **figures}
    if topo.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        plot = plot_loss_curve(run_dir, figures.get("held_out_loss"))
        logger.summary(figures)
        print("evaluation: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in figures.items()) + f"; loss curve: {plot}")
    sample = generate_sample(cfg, engine.model, dataset.tokenizer, topo.device)  # last: a failure loses nothing
    if topo.is_main and sample is not None:
        (run_dir / "sample.txt").write_text(sample)
        print(f"sample:\n{sample}")
    logger.close()
    return 0


def resolve_resume(resume: str, checkpointer: Checkpointer) -> Path | None:
    # A worker that torchrun restarted after a failure continues the run: the newest complete checkpoint.
    if resume == "auto" or (resume == "none" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0):
        return checkpointer.latest()
    if resume == "none":
        if checkpointer.latest() is not None:
            raise ConfigError(f"{checkpointer.root} already holds checkpoints: pass resume=auto or another run.dir")
        return None
    return Path(resume)


def resolve_micro_batch(cfg, raw_cfg, topo) -> int:
    """train.micro_batch_size, or (when unset) the global batch split evenly over the data-parallel ranks."""
    if cfg.train.micro_batch_size is not None:
        return cfg.train.micro_batch_size
    if cfg.train.global_batch_size % topo.dp_size:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} does not split over "
                          f"{topo.dp_size} data-parallel ranks; set train.global_batch_size or train.micro_batch_size")
    micro = cfg.train.global_batch_size // topo.dp_size
    cfg.train.micro_batch_size = raw_cfg.train.micro_batch_size = micro
    if topo.is_main:
        print(f"train.micro_batch_size={micro}: global batch {cfg.train.global_batch_size} over {topo.dp_size} "
              "data-parallel rank(s), no gradient accumulation (set it to accumulate)")
    return micro


def autocast_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def evaluate(cfg, model, dataset, topo, autocast_dtype, plot_dir: Path | None = None) -> dict:
    """The configured eval tasks on the live model (every rank takes part: the model may be sharded)."""
    return run_tasks(cfg, model, dataset, topo.device, autocast_dtype, progress=topo.is_main,
                     plot_dir=plot_dir if topo.is_main else None)


@torch.no_grad()
def generate_sample(cfg, model, tokenizer, device) -> str | None:
    """A short continuation of eval.sample_prompt (None without a tokenizer, e.g. data=mqar); a failure is
    reported in one line, never fatal."""
    if tokenizer is None or cfg.eval.sample_tokens == 0:
        return None
    try:
        prompt = [tokenizer.eos_id] + tokenizer.encode(cfg.eval.sample_prompt)
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=cfg.eval.sample_tokens,
                             temperature=cfg.eval.sample_temperature)
        return cfg.eval.sample_prompt + tokenizer.decode(out[0, len(prompt):].tolist())
    except Exception as err:  # the run's results are already written; a sample is not worth losing them
        print(f"warning: sample failed ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def main(argv: list[str]) -> int:
    with StopSignals() as stop:
        try:
            return run_cli(lambda: train(*load_config(argv), stop))
        except TrainingDiverged as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        except RuntimeError as err:
            timeout = describe_timeout(err, load_config(argv)[0].parallel.timeout_s)
            if timeout is None:
                raise
            print(f"error: rank {os.environ.get('RANK', 0)}: {timeout}", file=sys.stderr)
            return EXIT_TIMEOUT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
