"""Train a recurrent or hybrid language model, then evaluate it.

    python train.py                                     # the embedded default (what `make train` runs)
    python train.py model=transformer_tiny train.max_steps=50 run.dir=runs/x
    torchrun --nproc_per_node=8 train.py parallel=fsdp parallel.sp=2 ...
    python train.py run.dir=runs/x resume=auto          # continue from the newest complete checkpoint

Configs: configs/ (Hydra). Models: model/. Data: data/. Sharding, sequence parallelism and
checkpoints: parallel/. Evaluation: eval/.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from configs.errors import run_cli
from configs.schema import load_config
from data import PackedLoader, prepare_dataset
from eval.perplexity import evaluate_held_out
from parallel.checkpoint import Checkpointer
from parallel.build import build_engine
from parallel.topology import init_topology
from training.metrics import MetricsLogger, truncate_metrics
from training.optim import lr_at
from training.plots import plot_loss_curve


def train(cfg, raw_cfg) -> dict:
    topo = init_topology(cfg.parallel)
    run_dir = Path(cfg.run.dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    resume_from = resolve_resume(cfg.resume, checkpointer)
    torch.manual_seed(cfg.run.seed)

    dataset = prepare_dataset(cfg.data)
    tokenizer = dataset.tokenizer
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    engine = build_engine(cfg, topo)  # builds the model, sharded as the engine holds it
    loader = PackedLoader(dataset.train_sources, cfg.train.seq_len, cfg.train.micro_batch_size,
                          cfg.train.global_batch_size, topo.dp_rank, topo.dp_size, topo.sp_rank, topo.sp_size,
                          seed=cfg.run.seed, tokenizer_hash=tokenizer.hash, verify=dataset.verify)
    micro_per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp_size)  # the loader checked it
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

    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
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
        grad_norm = engine.step(lr)
        step += 1
        tokens_seen += tokens_per_step
        record = {"step": step, "loss": engine.all_reduce_mean(loss_sum.item()), "lr": lr, "grad_norm": grad_norm,
                  "tokens_seen": tokens_seen, "tokens_per_s": tokens_per_step / (time.perf_counter() - started)}
        logger.log(record)
        progress.update(1)
        if step % cfg.train.log_every == 0:
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.train.checkpoint_every and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps):
            checkpointer.save(step, engine,
                              {"tokens_seen": tokens_seen, "loader": loader.state_dict(), "model_config": model_config})
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            logger.log({"step": step, **evaluate(cfg, engine.model, dataset, topo, autocast_dtype).as_dict()})
    progress.close()

    held_out = evaluate(cfg, engine.model, dataset, topo, autocast_dtype)
    sample = generate_sample(cfg, engine.model, tokenizer, topo.device)
    results = {"step": step, "tokens_seen": tokens_seen, **held_out.as_dict(), "sample": sample}
    if topo.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        (run_dir / "sample.txt").write_text(sample)
        plot = plot_loss_curve(run_dir, held_out.loss)
        logger.summary(held_out.as_dict())
        print(f"held-out: {held_out.loss:.4f} nats/token, {held_out.bits_per_byte:.4f} bits/byte "
              f"({held_out.tokens} tokens); loss curve: {plot}")
        print(f"sample:\n{sample}")
    logger.close()
    return results


def resolve_resume(resume: str, checkpointer: Checkpointer) -> Path | None:
    if resume == "auto":
        return checkpointer.latest()
    if resume == "none":
        if checkpointer.latest() is not None:
            raise ValueError(f"{checkpointer.root} already holds checkpoints: pass resume=auto or another run.dir")
        return None
    return Path(resume)


def autocast_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def evaluate(cfg, model, dataset, topo, autocast_dtype):
    return evaluate_held_out(model, dataset.held_out_documents(), dataset.tokenizer.eos_id, cfg.train.seq_len,
                             cfg.eval.batch_size, cfg.eval.held_out_tokens, topo.device, autocast_dtype,
                             progress=topo.is_main)


@torch.no_grad()
def generate_sample(cfg, model, tokenizer, device) -> str:
    prompt = [tokenizer.eos_id] + tokenizer.encode(cfg.eval.sample_prompt)
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=cfg.eval.sample_tokens,
                         temperature=cfg.eval.sample_temperature)
    return cfg.eval.sample_prompt + tokenizer.decode(out[0, len(prompt):].tolist())


def main(argv: list[str]) -> int:
    return run_cli(lambda: train(*load_config(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
