"""Train a recurrent or hybrid language model, then evaluate it.

    python train.py                                     # the embedded default (what `make train` runs)
    python train.py model=transformer_tiny train.max_steps=50 run.dir=runs/x
    torchrun --nproc_per_node=8 train.py parallel=fsdp parallel.sp=2 ...
    python train.py run.dir=runs/x resume=auto          # continue from the newest complete checkpoint
    python train.py init.from=imports/llama             # start from an export's or HF model's weights

Configs: configs/ (Hydra). Models: model/. Data: data/. Sharding and sequence parallelism:
parallel/. Checkpoints: checkpoints/. Evaluation: eval/. Signals, bad steps and exit codes: training/faults.py.
"""
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from checkpoints import Checkpointer
from checkpoints.initial import apply_init_from, open_weights
from configs.errors import ConfigError, run_cli
from configs.schema import BatonConfig, compose_config, load_config, typed
from data import prepare_dataset
from data.loader import batch_to_device
from data.mlm import MaskedLoader, mlm_vocab
from eval import run_tasks
from model.config import vocab_for_data
from model.pararnn import newton_iterations
from parallel.build import build_engine
from parallel.mesh import leave_process_group
from parallel.topology import Topology, init_topology
from training.faults import (EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_TIMEOUT, StepGuard, StopSignals, TrainingDiverged,
                             describe_timeout)
from training.metrics import MetricsLogger, StepTimer, console_line, truncate_metrics
from training.optim import lr_at
from training.plots import plot_loss_curve
from training.profile import StepProfiler


def train(raw_cfg: DictConfig, stop: StopSignals) -> int:
    run = setup(raw_cfg)
    run.engine.model.train()
    while run.step < run.cfg.train.max_steps:
        started = time.perf_counter()
        loss, grad_norm, lr, stop_requested = train_step(run, stop)
        log_step(run, loss, grad_norm, lr, time.perf_counter() - started)
        if run.checkpoint_due() or stop_requested:
            run.save_checkpoint()
        if stop_requested:
            return stop_early(run, stop)
        if run.eval_due():
            run.logger.log({"step": run.step, **evaluate(run)})
    return finish(run)


@dataclass
class Run:
    """What a training run holds from its setup to its end."""
    cfg: BatonConfig
    raw_cfg: DictConfig  # the resolved config cfg was typed from: config.yaml and the checkpoints' model config
    topo: Topology
    dataset: object
    engine: object
    loader: object
    checkpointer: Checkpointer
    logger: MetricsLogger
    timer: StepTimer
    guard: StepGuard
    profiler: StepProfiler
    progress: tqdm
    autocast_dtype: torch.dtype | None
    step: int = 0
    tokens_seen: int = 0
    micro_per_step: int = field(init=False)
    tokens_per_step: int = field(init=False)

    def __post_init__(self):
        batch = self.cfg.train
        self.micro_per_step = batch.global_batch_size // (batch.micro_batch_size * self.topo.dp_size)  # loader-checked
        self.tokens_per_step = batch.global_batch_size * batch.seq_len

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    def train_state(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "loader": self.loader.state_dict(),
                "model_config": OmegaConf.to_container(self.raw_cfg.model)}

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step, self.engine, self.train_state())

    def checkpoint_due(self) -> bool:
        every, last = self.cfg.train.checkpoint_every, self.cfg.train.max_steps
        return bool(every) and (self.step % every == 0 or self.step == last)

    def eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and self.step % every == 0 and self.step < self.cfg.train.max_steps


def setup(raw_cfg: DictConfig) -> Run:
    """Join the ranks, prepare the data, resolve the config, build the engine and loader, resume if asked."""
    cfg = typed(raw_cfg)
    topo = init_topology(cfg.parallel)
    run_dir = Path(cfg.run.dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    resume_from = resolve_resume(cfg.resume, checkpointer)
    torch.manual_seed(cfg.run.seed)
    micro_batch = cfg.train.micro_batch_size or default_micro_batch(cfg, topo)  # checked before the data is read
    dataset = prepare_dataset(cfg.data)
    # What follows the run goes into the one resolved config, which config.yaml, the checkpoints' model config
    # and (typed again) cfg all come from.
    mlm = cfg.train.objective == "mlm"  # the mask id is one past the data's ids (data/mlm.py)
    raw_cfg.model.update((mlm_vocab if mlm else vocab_for_data)(cfg.model, dataset.vocab_size))  # null: the data's
    raw_cfg.train.micro_batch_size = micro_batch
    cfg = typed(raw_cfg)
    # A resumed run continues its checkpoint: the weights it started from are not read again.
    initial_weights = open_weights(cfg.init["from"]) if cfg.init["from"] and resume_from is None else None
    engine = build_engine(cfg, topo, initial_weights)  # builds the model, sharded as the engine holds it
    loader = dataset.loader(cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size, topo.dp_rank,
                            topo.dp_size, topo.sp_rank, topo.sp_size, seed=cfg.run.seed)
    if mlm:
        loader = MaskedLoader(loader, cfg.train.mlm, dataset.vocab_size, dataset.vocab_size, cfg.run.seed)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = checkpointer.load(resume_from, engine, OmegaConf.to_container(raw_cfg.model))
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        if topo.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
            print(f"resumed from {resume_from} at step {step}")
    if topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw_cfg))  # init.from: where the run started
        if initial_weights is not None:
            print(f"started from the weights of {cfg.init['from']}")
    return Run(
        cfg, raw_cfg, topo, dataset, engine, loader, checkpointer,
        logger=MetricsLogger(run_dir, cfg.logging.wandb, OmegaConf.to_container(raw_cfg), enabled=topo.is_main),
        timer=StepTimer(engine.model.flops_per_token(cfg.train.seq_len), topo.device, topo.world_size),
        guard=StepGuard(cfg.train.max_bad_steps, cfg.train.spike_factor),
        profiler=StepProfiler(cfg.train.profile.steps, run_dir / "profile", topo.rank),
        progress=tqdm(total=cfg.train.max_steps, initial=step, desc="train", disable=not topo.is_main),
        autocast_dtype=autocast_dtype_for(cfg.train.dtype, topo.device), step=step, tokens_seen=tokens_seen)


def train_step(run: Run, stop: StopSignals) -> tuple[float, float, float, bool]:
    """One optimizer step over the step's micro-batches. Returns the mean loss over all ranks, the gradient
    norm, the learning rate, and whether any rank was asked to stop."""
    device = run.topo.device
    loss_sum = torch.zeros((), device=device)
    for _ in range(run.micro_per_step):
        batch = batch_to_device(next(run.loader), device)
        loss = compute_loss(run.engine, batch, run.autocast_dtype, run.cfg.train.distill) / run.micro_per_step
        run.engine.backward(loss)
        loss_sum += loss.detach()
    lr = lr_at(run.step, run.cfg.train.max_steps, run.cfg.optim)
    grad_norm = run.engine.step(lr)  # a non-finite gradient norm: the update is skipped
    loss_mean, stop_requested = run.engine.reduce_step(loss_sum.item(), stop.received is not None)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    return loss_mean, grad_norm, lr, stop_requested


def compute_loss(engine, batch: dict, autocast_dtype: torch.dtype | None, distill: float = 0.0) -> torch.Tensor:
    """The mean next-token cross-entropy of one micro-batch: the head and the loss fused (model/loss.py), so the
    [tokens, vocab] logits never exist whole; with distill, plus distill x KL to the frozen teacher's (model/lm.py).
    Masked LM (a batch with loss_divisor, data/mlm.py): the summed loss of the masked tokens over loss_divisor, so
    that the step's loss is the mean over every masked token of it."""
    device_type = batch["input_ids"].device.type
    mlm = "loss_divisor" in batch
    extra = {"distill": distill} if distill else {}
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = engine.model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], sp=engine.sequence_parallel(batch),
                            labels=batch["labels"], reduction="sum" if mlm else "mean", **extra)
    return loss / batch["loss_divisor"] if mlm else loss


def log_step(run: Run, loss: float, grad_norm: float, lr: float, seconds: float) -> None:
    """The step's metrics record (and the divergence check on it), a finished background save, the
    progress bar, and every log_every steps the console line and the loss curve."""
    max_steps = run.cfg.train.max_steps
    run.profiler.step(run.step)
    record = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": run.tokens_seen,
              **run.timer.step(seconds, run.tokens_per_step, max_steps - run.step),
              **run.guard.check(run.step, loss, grad_norm), **newton_iterations(run.engine.model)}
    run.logger.log(record)
    run.guard.raise_if_diverged()
    run.logger.log(run.checkpointer.poll())  # a save finished in the background: when, and what it cost the loop
    run.progress.update(1)
    if run.step % run.cfg.train.log_every == 0 and run.topo.is_main:
        run.progress.write(console_line(record, max_steps))
        plot_loss_curve(run.run_dir)


def stop_early(run: Run, stop: StopSignals) -> int:
    """A stop signal (on any rank): the checkpoint of this step is saved; wait for it and exit."""
    run.logger.log(run.checkpointer.wait())
    run.progress.close()
    run.logger.close()
    if run.topo.is_main:
        print(f"stopped by {stop.received or 'a signal to another rank'} at step {run.step}; checkpoint saved, "
              f"resume=auto continues (exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    leave_process_group()
    return EXIT_PREEMPTED


def finish(run: Run) -> int:
    """The end of a complete run: the last save published, the evaluation, results.json, the loss curve and a
    sample (last: a failure there loses nothing)."""
    run.logger.log(run.checkpointer.wait())
    run.progress.close()
    figures = evaluate(run, plot_dir=run.run_dir)
    if run.topo.is_main:
        results = {"step": run.step, "tokens_seen": run.tokens_seen, **figures}
        (run.run_dir / "results.json").write_text(json.dumps(results, indent=1))
        plot = plot_loss_curve(run.run_dir, figures.get("held_out_loss"))
        run.logger.summary(figures)
        print("evaluation: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in figures.items()) + f"; loss curve: {plot}")
    sample = generate_sample(run.cfg, run.engine.model, run.dataset.tokenizer, run.topo.device)
    if run.topo.is_main and sample is not None:
        (run.run_dir / "sample.txt").write_text(sample)
        print(f"sample:\n{sample}")
    run.logger.close()
    leave_process_group()
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


def default_micro_batch(cfg: BatonConfig, topo: Topology) -> int:
    """The global batch split evenly over the data-parallel ranks (train.micro_batch_size unset)."""
    if cfg.train.global_batch_size % topo.dp_size:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} does not split over "
                          f"{topo.dp_size} data-parallel ranks; set train.global_batch_size or train.micro_batch_size")
    micro = cfg.train.global_batch_size // topo.dp_size
    if topo.is_main:
        print(f"train.micro_batch_size={micro}: global batch {cfg.train.global_batch_size} over {topo.dp_size} "
              "data-parallel rank(s), no gradient accumulation (set it to accumulate)")
    return micro


def autocast_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def evaluate(run: Run, plot_dir: Path | None = None) -> dict:
    """The configured eval tasks on the live model (every rank takes part: the model may be sharded)."""
    return run_tasks(run.cfg, run.engine.model, run.dataset, run.topo.device, run.autocast_dtype,
                     progress=run.topo.is_main, plot_dir=plot_dir if run.topo.is_main else None)


@torch.no_grad()
def generate_sample(cfg, model, tokenizer, device) -> str | None:
    """A short continuation of eval.sample_prompt (None without a tokenizer, e.g. data=mqar); a failure is
    reported in one line, never fatal."""
    if tokenizer is None or cfg.eval.sample_tokens == 0 or cfg.model.is_encoder:  # an encoder does not generate
        return None
    try:
        prompt = [tokenizer.eos_id] + tokenizer.encode(cfg.eval.sample_prompt)
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=cfg.eval.sample_tokens,
                             temperature=cfg.eval.sample_temperature)
        return cfg.eval.sample_prompt + tokenizer.decode(out[0, len(prompt):].tolist())
    except Exception as err:  # the run's results are already written; a sample is not worth losing them
        print(f"warning: sample failed ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def resolved_config(argv: list[str]) -> DictConfig:
    raw = compose_config(argv)
    apply_init_from(raw, argv)  # init.from: the weights' model and tokenizer, before the config is checked
    typed(raw.copy())
    return raw


def main(argv: list[str]) -> int:
    with StopSignals() as stop:
        try:
            return run_cli(lambda: train(resolved_config(argv), stop))
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
