"""Liger linearization measured (model/liger.py, `init.linearize=liger`): how much of a pretrained Transformer a
linearized model keeps, and at what cost in tokens.

    python -m bench.linearize --grid 'scratch:0.05,0.1,0.25,1'   # the README's run (plus scratch at 100%)
    python -m bench.linearize --fractions 0.1 --variants liger_lora,scratch --skip-hf   # a part of it
    python -m bench.linearize --out runs/bench_linearize   # where the runs go (kept: a rerun reuses finished ones)

1. The teacher: `transformer_tiny` trained with `make train`'s budget on the stdlib corpus (560 steps of 8 x 256
   tokens), through train.py, then exported.
2. Each variant through train.py from that export, with 5%, 10% and 25% of the teacher's tokens (--fractions): Liger
   (GLA gate) with LoRA rank 8 on q, k, v at lr 1e-3 (the paper's recipe), Liger-H (layer 4 of 4 kept as attention,
   init.keep_attention_every=4), Liger with full fine-tuning, Liger with LoRA and distillation against the teacher
   (train.distill=1), and the same recurrent shape (ZZZZ) trained from scratch on the same tokens; plus the linearized
   model before any fine-tuning. Each is scored on the whole held-out split (bits per byte, python -m eval's `ppl`).
   recovery = (bpb_scratch - bpb_variant) / (bpb_scratch - bpb_teacher), the scratch model at the same tokens.
3. Decode state against context: the teacher's KV caches grow with it, Liger's recurrent state and window do not
   (LM.init_state's bytes, fp32, batch 1).
4. The path from Hugging Face: a tiny random Llama made with transformers (and a BPE tokenizer trained with
   tokenizers), imported, linearized, fine-tuned with LoRA on the stdlib corpus in its own ids, exported with
   format=hf, and loaded by transformers in a process that cannot import Baton: generate's tokens and the logits
   against Baton's.
Prints the tables, writes bench/results/linearize_<date>.json and .png.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import REPO, RESULTS_DIR, print_table, write_results

TEACHER_STEPS, BATCH, SEQ_LEN = 560, 8, 256  # make train's budget (configs/train/default.yaml)
VARIANTS = {  # name: (what, overrides)
    "liger_lora": ("Liger (GLA gate), LoRA r8 on q,k,v", ["init.linearize=liger", "model.lora.rank=8",
                                                           "optim.lr=1e-3"]),
    "liger_h_lora": ("Liger-H (ZZZA), LoRA r8", ["init.linearize=liger", "init.keep_attention_every=4",
                                                "model.lora.rank=8", "optim.lr=1e-3"]),
    "liger_full": ("Liger, full fine-tuning", ["init.linearize=liger", "optim.lr=3e-4"]),
    "liger_lora_distill": ("Liger, LoRA r8 + distillation (w=1)", ["init.linearize=liger", "model.lora.rank=8",
                                                                 "optim.lr=1e-3", "train.distill=1.0"]),
    "scratch": ("the same shape (ZZZZ) from scratch", ["model=transformer_tiny", "model.pattern=Z"]),
    # lower learning rates (the teacher's schedule ended at 8e-5): in the grid only when --grid names them
    "liger_lora_lr3e-4": ("Liger, LoRA r8, lr 3e-4", ["init.linearize=liger", "model.lora.rank=8", "optim.lr=3e-4"]),
    "liger_lora_lr1e-4": ("Liger, LoRA r8, lr 1e-4", ["init.linearize=liger", "model.lora.rank=8", "optim.lr=1e-4"]),
    "liger_full_lr5e-5": ("Liger, full fine-tuning, lr 5e-5", ["init.linearize=liger", "optim.lr=5e-5"]),
}
DEFAULT_VARIANTS = ["liger_lora", "liger_h_lora", "liger_full", "liger_lora_distill", "scratch"]
CONTEXTS = [256, 1024, 4096, 16384, 32768]
HF_STEPS = 30
EVAL: list[str] = []  # --eval-tokens: eval.held_out_tokens for every score (default: the whole held-out split)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], log_file: Path, what: str) -> None:
    started = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): see {log_file}")
    log(f"{what}: {time.perf_counter() - started:.0f} s")


def train(out: Path, name: str, overrides: list[str], what: str) -> dict:
    """train.py into out/name (reused when it finished before); its results.json plus the wall time."""
    run_dir = out / name
    results = run_dir / "results.json"
    if not results.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        run([sys.executable, "train.py", f"run.dir={run_dir}", "logging.wandb.mode=disabled", "eval.tasks=[ppl]",
             "eval.sample_tokens=32", *EVAL, *overrides], out / f"{name}.log", what)
        (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - started:.1f}")
    figures = json.loads(results.read_text())
    figures["wall_s"] = float((run_dir / "wall_s.txt").read_text()) if (run_dir / "wall_s.txt").exists() else None
    return figures


def export(checkpoint: Path, out: Path, what: str, fmt: str = "baton") -> Path:
    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        run([sys.executable, "-m", "scripts.export", f"checkpoint={checkpoint}", f"out={out}", f"format={fmt}"],
            out.with_suffix(".log"), what)
    return out


def linearized_export(teacher: Path, out: Path, keep_attention_every=None) -> Path:
    """The teacher's weights in the Liger model, unchanged (no fine-tuning), as an export python -m eval scores."""
    if (out / "config.json").exists():
        return out
    from omegaconf import OmegaConf

    from checkpoints.export import write_export
    from checkpoints.initial import linearize_model_config, load_weights, open_weights
    from configs.schema import typed
    from data import prepare_dataset
    from model import LM

    run_config = OmegaConf.load(teacher / "config.yaml")
    linearize_model_config(run_config.model, keep_attention_every)
    model = LM.from_config(run_config.model)
    load_weights(model, open_weights(teacher))
    tokenizer = prepare_dataset(typed(run_config.copy()).data).tokenizer
    write_export(model, out, run_config, tokenizer, {"linearized_from": str(teacher)})
    return out


def score(export_dir: Path, out: Path, what: str) -> dict:
    """python -m eval's ppl task on the held-out split (as train.py's end of run does): its flat figures."""
    result = out / "eval.json"
    if not result.exists():
        run([sys.executable, "-m", "eval", f"checkpoint={export_dir}", "tasks=[ppl]", f"out={out}", *EVAL],
            out.with_suffix(".log"), what)
    return json.loads(result.read_text())


def figures_of(figures: dict) -> dict:
    """What a row keeps of a run's ppl figures."""
    keys = ("held_out_bpb", "held_out_loss", "ppl_loss_within_train_len", "ppl_loss_beyond_train_len", "wall_s")
    return {key: figures[key] for key in keys if figures.get(key) is not None}


def decode_memory(teacher: Path) -> list[dict]:
    """Bytes of the preallocated decode state (batch 1, fp32) against the context, for the teacher and its Liger
    and Liger-H forms (same weights: the state does not depend on them)."""
    from omegaconf import OmegaConf

    from checkpoints.initial import linearize_model_config
    from model import LM

    config = OmegaConf.load(teacher / "config.yaml").model
    models = {"teacher (AAAA)": LM.from_config(config)}
    for name, keep in (("Liger (ZZZZ)", None), ("Liger-H (ZZZA)", 4)):
        liger = config.copy()
        linearize_model_config(liger, keep)
        models[name] = LM.from_config(liger)
    rows = []
    for context in CONTEXTS:
        row = {"context": context}
        for name, model in models.items():
            row[f"{name} MiB"] = model.init_state(1, context).nbytes() / 2 ** 20
        rows.append(row)
    return rows


TOKENIZER_TEXT_FILES = 300  # stdlib files the tiny Llama's BPE tokenizer is trained on


LLAMA = {"layers": 4, "d_model": 128, "heads": "4 query / 2 KV", "d_ff": 352, "vocab": 4096, "tied": False}


def tiny_llama(directory: Path) -> None:
    """A random LlamaForCausalLM (4 layers, d 128, 4 query / 2 KV heads, untied) and a byte-level BPE tokenizer
    (4,096 ids, trained on stdlib sources), saved as a Hugging Face model directory."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data.stdlib import stdlib_files

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = [str(path) for path in stdlib_files()[:TOKENIZER_TEXT_FILES]]
    tokenizer.train(files, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))


LOAD_AND_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
expected = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True)
ids = torch.tensor(expected["prompt"])
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=expected["new_tokens"], do_sample=False)
    error = (model(ids).logits - torch.tensor(expected["logits"])).abs().amax().item()
print(json.dumps({"tokens_equal": out.tolist() == expected["generated"], "max_abs_logit_diff": error,
                  "class": type(model).__name__}))
"""


def hf_path(out: Path) -> dict:
    """import -> linearize -> fine-tune -> export (format=hf) -> transformers' generate, outside Baton."""
    from checkpoints import load_model
    from checkpoints.initial import import_export

    hf_dir, imported, run_dir = out / "hf_llama", out / "hf_import", out / "hf_liger"
    report = {"llama": LLAMA}
    if not (imported / "config.json").exists():
        tiny_llama(hf_dir)
        import_export(hf_dir, imported)
    log("HF Llama imported")
    figures = train(out, "hf_liger", [f"init.from={imported}", "init.linearize=liger", "model.lora.rank=8",
                                      "optim.lr=1e-3", f"train.max_steps={HF_STEPS}",
                                      f"train.checkpoint_every={HF_STEPS}",
                                      "optim.warmup_steps=3", "eval.held_out_tokens=20000"],
                    "HF Llama linearized and fine-tuned")
    checkpoint = run_dir / "checkpoints" / f"step_{HF_STEPS:06d}"
    export_dir = export(checkpoint, out / "hf_export", "HF-format export", fmt="hf")
    student = load_model(checkpoint).eval()
    prompt = torch.randint(3, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {"prompt": prompt.tolist(), "new_tokens": 24, "logits": student(prompt).tolist(),
                    "generated": student.generate(prompt, 24, temperature=0).tolist()}
    (out / "hf_expected.json").write_text(json.dumps(expected))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_MODULES_CACHE": str(out / "hf_modules"),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out / "hf_expected.json"), str(export_dir)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"transformers could not load the export: {proc.stderr[-2000:]}")
    report.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    report.update(pattern=student.config.pattern, steps=HF_STEPS, held_out_bpb=figures["held_out_bpb"],
                  params=student.num_params(), export=str(export_dir))
    log(f"HF path: {report}")
    return report


def markdown(rows: list[dict]) -> str:
    """The rows as the README's table."""
    fmt = lambda x, spec: "" if x is None else format(x, spec)
    lines = ["| model | training tokens | steps | held-out bits/byte | recovery vs scratch | gap closed | "
             "loss ≤ 256 / 257-1024 (nats) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        share = "" if row["fraction"] is None else ("0" if row["fraction"] == 0 else f"{100 * row['fraction']:g}%")
        lines.append(f"| {row['variant']} | {share} | {row['steps']} | {row['held_out_bpb']:.4f} | "
                     f"{fmt(row.get('recovery'), '.3f')} | {fmt(row.get('gap_closed'), '.2f')} | "
                     f"{fmt(row.get('ppl_loss_within_train_len'), '.3f')} / "
                     f"{fmt(row.get('ppl_loss_beyond_train_len'), '.3f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], teacher_bpb: float, fractions: list[float], memory: list[dict], path: Path) -> None:
    """Held-out bits per byte against training tokens (every model; then the fine-tuned ones close up) and the
    decode state against context."""
    from eval.results import plt, save_figure

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    before = [row["held_out_bpb"] for row in rows if row["key"] == "linearized"]
    names = list(dict.fromkeys(row["variant"] for row in rows if row["fraction"] and row["key"] != "teacher"))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one color per model in both panels
    for axis, keys in ((left, None), (middle, "liger")):
        for name in names:
            points = sorted((row["fraction"], row["held_out_bpb"]) for row in rows if row["variant"] == name
                            and row["fraction"] and (keys is None or row["key"].startswith(keys)))
            if points:
                axis.plot([100 * f for f, _ in points], [b for _, b in points], marker="o", label=name,
                          color=colors[name])
        axis.axhline(teacher_bpb, color="black", linestyle="--", label="teacher (100%)")
        if before:
            axis.axhline(before[0], color="grey", linestyle=":", label="linearized, no fine-tuning")
        axis.set_xlabel("training tokens (% of the teacher's)")
        axis.set_ylabel("held-out bits per byte")
        axis.set_xscale("log")
        ticks = sorted({100 * row["fraction"] for row in rows if row["fraction"]
                        and (keys is None or row["key"].startswith(keys))})
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axis.minorticks_off()
    left.set_title("transformer_tiny linearized vs from scratch")
    left.legend(fontsize=7)
    middle.set_title("the linearized models, close up")
    for name in [k for k in memory[0] if k != "context"]:
        right.plot([m["context"] for m in memory], [m[name] for m in memory], marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("context (tokens)")
    right.set_ylabel("decode state, batch 1, fp32 (MiB)")
    right.set_title("decode memory against context")
    right.legend(fontsize=8)
    save_figure(fig, path)
    print(f"figure written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_linearize")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--fractions", default="0.05,0.1,0.25")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--grid", default="",
                        help="variant:fractions;... to run some variants at fewer fractions, e.g. "
                             "'liger_full:0.1;liger_lora_distill:0.1' (the others: --fractions)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored (default: all)")
    args = parser.parse_args(argv)
    if args.eval_tokens:
        EVAL.append(f"eval.held_out_tokens={args.eval_tokens}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    grid = {v: fractions for v in args.variants.split(",")}
    for item in filter(None, args.grid.split(";")):
        variant, values = item.split(":")
        grid[variant] = [float(f) for f in values.split(",")]
    started = time.perf_counter()

    teacher_tokens = args.teacher_steps * BATCH * SEQ_LEN
    teacher_figures = train(out, "teacher", ["model=transformer_tiny", f"train.max_steps={args.teacher_steps}"],
                            f"teacher: transformer_tiny, {args.teacher_steps} steps")
    teacher = export(out / "teacher" / "checkpoints" / f"step_{args.teacher_steps:06d}", out / "teacher_export",
                     "teacher export")
    teacher_bpb = teacher_figures["held_out_bpb"]
    rows = [{"variant": "teacher (AAAA)", "key": "teacher", "fraction": 1.0, "steps": args.teacher_steps,
             "tokens": teacher_tokens, **figures_of(teacher_figures)}]
    for name, keep in (("linearized, no fine-tuning", None), ("Liger-H, no fine-tuning", 4)):
        directory = out / ("linearized" if keep is None else "linearized_h")
        figures = score(linearized_export(teacher, directory, keep), out / f"{directory.name}_eval", name)
        rows.append({"variant": name, "key": directory.name, "fraction": 0.0, "steps": 0, "tokens": 0,
                     **figures_of(figures)})

    for variant, variant_fractions in grid.items():
        what, overrides = VARIANTS[variant]
        for fraction in variant_fractions:
            steps = max(1, round(fraction * args.teacher_steps))
            start = [] if variant == "scratch" else [f"init.from={teacher}"]
            figures = train(out, f"{variant}_{fraction:g}",
                            [*start, *overrides, f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                             f"optim.warmup_steps={max(1, steps // 10)}"], f"{what}, {fraction:.0%} ({steps} steps)")
            rows.append({"variant": what, "key": variant, "fraction": fraction, "steps": steps,
                         "tokens": steps * BATCH * SEQ_LEN, **figures_of(figures)})
    scratch = {row["fraction"]: row["held_out_bpb"] for row in rows if row["key"] == "scratch"}
    before = {row["key"]: row["held_out_bpb"] for row in rows if row["fraction"] == 0.0}
    for row in rows:
        reference = scratch.get(row["fraction"]) if row["fraction"] else None
        if reference is not None and row["key"] not in ("scratch", "teacher") and reference != teacher_bpb:
            row["recovery"] = (reference - row["held_out_bpb"]) / (reference - teacher_bpb)
        # the part of the linearization's loss that fine-tuning won back: (before - x) / (before - teacher)
        start = before.get("linearized_h" if row["key"].startswith("liger_h") else "linearized")
        if row["key"].startswith("liger") and start is not None and start != teacher_bpb:
            row["gap_closed"] = (start - row["held_out_bpb"]) / (start - teacher_bpb)

    print_table("held-out bits per byte (stdlib held-out split); recovery = (scratch - x) / (scratch - teacher) at "
                "the same tokens; gap_closed = (linearized - x) / (linearized - teacher)",
                [{k: v for k, v in row.items() if k != "key"} for row in rows])
    print("\n" + markdown(rows))
    memory = decode_memory(teacher)
    print_table("decode state (batch 1, fp32, MiB) against context", memory)
    report = {"teacher": {"preset": "transformer_tiny", "steps": args.teacher_steps, "tokens": teacher_tokens,
                          "held_out_bpb": teacher_bpb},
              "settings": {"batch": BATCH, "seq_len": SEQ_LEN, "variants": {k: VARIANTS[k] for k in grid},
                           "grid": grid, "torch_threads": torch.get_num_threads(),
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "rows": rows, "decode_memory": memory}
    if not args.skip_hf:
        report["hf_path"] = hf_path(out)
    report["wall_s"] = time.perf_counter() - started
    path = write_results("linearize", report)
    plot(rows, teacher_bpb, fractions, memory, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
