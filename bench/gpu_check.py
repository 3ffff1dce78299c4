"""One command for a lent GPU: the GPU tests, our kernels against flash-linear-attention and SDPA, and the
training throughput of the 370M presets, within a time budget (default 6 minutes).

    python -m bench.gpu_check                                # on one H100/H200 (README: "GPU check")
    python -m bench.gpu_check --budget-s 600 --stages kernels training
    python -m bench.gpu_check --dry-run                      # on CPU: every step short of the GPU

Stages, in this order, each with its share of what is left of the budget:
  tests     `pytest -m gpu` (with pytest-xdist's `-n` when it is installed): counts and failing tests.
  kernels   our chunk_gla (vector gate: GLA; scalar gate: Mamba2) and chunk_gated_delta_rule against
            flash-linear-attention's same ops and torch SDPA (causal, flash), forward + backward in bf16 at
            GPU_SHAPES, and at each shape ours against the fp32 chunked PyTorch reference (kernels' CPU path)
            on the same inputs: relative error (||ours - ref|| / ||ref||) of o and of every gradient.
            fla missing or refusing an op is reported, never a failure.
  training  train.py itself on each 370M preset at seq 2048 (16 x 2048 tokens per step, random MQAR rows
            at a 32,000-token vocabulary) for a few steps: median step after warm-up, and tokens/s, MFU and
            peak memory as train.py logs them (training/metrics.py, model/flops.py).
Everything that can crash runs in a subprocess with a deadline (its own process group, killed at the
deadline), so a crash, an OOM or a slow compile costs only that item. The JSON
(bench/results/gpu_check_<device>_<date>.json: device, versions, git commit, date, every stage) is rewritten
after every result, so a killed run leaves what it measured; the tables are printed at the end.

--dry-run (CPU, about a minute): imports, every preset built on the meta device, the kernel children at
tiny shapes on the PyTorch path (the numerical check's code), train.py's subprocess path on shrunken presets,
`pytest --collect-only -m gpu`, and the JSON and tables; each stage's status is "ok" when its part works.

Exit status: 0 when it ran, whatever it could not do (listed in the JSON and the tables); 1 when one of our
kernels fails the numerical check at a benchmark shape (or raises there).
"""
import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path

import torch

from bench.common import REPO, RESULTS_DIR, package_version, print_table, versions
from bench.kernels import GPU_SHAPES, make_inputs, sdpa_causal, time_cpu, time_gpu

STAGES = ("tests", "kernels", "training")
STAGE_SHARES = {"tests": 0.25, "kernels": 0.35, "training": 0.40}  # of the budget left when a stage starts
FINISH_MARGIN_S = 5.0  # kept back from the budget for the last JSON and the tables
POLL_EVERY_S = 2.0  # how often a running training subprocess's metrics are copied into the JSON
ROW_PREFIX = "gpu_check-row: "  # a child's result line on stdout (the rest of its output is log)

KERNEL_OPS = ("sdpa", "gla", "gla_scalar", "gated_delta_rule")  # sdpa first: fast, and no Triton compile
FLA_OPS = {"gla": ("fla.ops.gla", "chunk_gla"), "gla_scalar": ("fla.ops.simple_gla", "chunk_simple_gla"),
           "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")}
DRY_RUN_SHAPES = [(2, 64, 2, 32), (1, 200, 2, 16)]  # a length that is not a multiple of the 64-token chunk
# ||ours - ref|| / ||ref|| with bf16 inputs: the kernels round dot operands and outputs to bf16 (8 significant
# bits, 2^-9 relative) and accumulate in fp32, which gives a few 1e-3; an indexing or masking bug gives O(1).
CHECK_TOLERANCE = 2e-2

TRAIN_PRESETS = ("transformer_370m", "gla_hybrid_370m", "mamba2_hybrid_370m", "gated_deltanet_hybrid_370m")
# train.py's settings: 16 x 2048 tokens per step at the 32,000-token vocabulary the presets' counts assume;
# the dry run's, seconds on a CPU.
TRAINING = dict(seq_len=2048, train_batch=16, train_steps=8, train_warmup=3, train_vocab=32_000)
DRY_RUN_TRAINING = dict(seq_len=64, train_batch=2, train_steps=3, train_warmup=1, train_vocab=512)
# The dry run's presets, shrunk to seconds on a CPU (every mixer keeps its kind and options).
DRY_RUN_WIDTH = ["model.d_model=64", "model.n_layers=4", "model.d_ff=128", "model.attention.num_heads=2",
                 "model.gla.num_heads=2", "model.mamba2.head_dim=16", "model.mamba2.d_state=16",
                 "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_dim=16"]
REQUIRED_MODULES = ("torch", "triton", "kernels", "train")  # train: everything a training run imports
OPTIONAL_MODULES = {"fla": "flash-linear-attention's ops (the kernel comparison)",
                    "xdist": "pytest-xdist (tests in parallel processes)"}
ENV_RECORDED = ("BATON_KERNELS", "BATON_AUTOTUNE", "TRITON_INTERPRET", "TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES")


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def last_error_line(lines) -> str:
    """The line of a child's output that names its failure: the last 'SomethingError: ...' line, else the last line."""
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line.strip())]
    return (errors or lines or ["(no output)"])[-1].strip()[:300]


# ---- subprocesses with a deadline -----------------------------------------------------------------

def run_with_deadline(command: list[str], timeout_s: float, on_line=None, poll=None) -> dict:
    """Run a command in its own process group, hand each output line (stdout and stderr) to on_line as it
    comes, call poll every few seconds while it runs, kill the whole group at the deadline. Returns returncode
    (None when killed), timed_out, seconds and the last lines of output."""
    started = time.perf_counter()
    tail = deque(maxlen=40)
    if timeout_s <= 0:
        return dict(returncode=None, timed_out=True, seconds=0.0, tail=["no time left in the budget"])
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = started + timeout_s
    try:
        while proc.poll() is None and time.perf_counter() < deadline:
            try:
                proc.wait(timeout=min(POLL_EVERY_S, max(0.0, deadline - time.perf_counter())))
            except subprocess.TimeoutExpired:
                if poll is not None:
                    poll()
    finally:  # the deadline, or this process interrupted (Ctrl-C, SIGTERM): the child's session gets no signal
        timed_out = proc.poll() is None
        if timed_out:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: pytest-xdist workers, compile workers
            proc.wait()
    reader.join(timeout=10)
    return dict(returncode=None if timed_out else proc.returncode, timed_out=timed_out,
                seconds=round(time.perf_counter() - started, 1), tail=list(tail))


class Budget:
    """The whole command's deadline, and each stage's share of what is left."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return max(0.0, self.total_s - FINISH_MARGIN_S - self.elapsed())

    def for_stage(self, stage: str, stages_left: list[str]) -> float:
        return self.left() * STAGE_SHARES[stage] / sum(STAGE_SHARES[s] for s in stages_left)


class Report:
    """The results JSON, rewritten (atomically) after every result."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data
        self.lock = threading.Lock()

    def save(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)

    def stage(self, name: str) -> dict:
        return self.data["stages"][name]


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():5.0f}s] {message}", flush=True)


# ---- setup: device, versions, imports, presets ------------------------------------------------------

def git_commit() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.CalledProcessError):
        return dict(commit=None, dirty=None, note="not a git checkout (a copied tree): commit unknown")


def device_info() -> dict:
    if not torch.cuda.is_available():
        return dict(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    props = torch.cuda.get_device_properties(0)
    return dict(device=props.name, capability=f"sm_{props.major}{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), gpus_visible=torch.cuda.device_count())


def load_preset(name: str, seq_len: int) -> dict:
    """A preset built on the meta device at the 32K vocabulary: parameters and training FLOPs per token."""
    from omegaconf import OmegaConf

    from model import LM
    cfg = OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")
    cfg.vocab_size = TRAINING["train_vocab"]
    with torch.device("meta"):
        lm = LM.from_config(cfg)
    return dict(preset=name, params_m=round(lm.num_params() / 1e6, 1), pattern=str(cfg.pattern),
                flops_per_token=lm.flops_per_token(seq_len))


def stage_setup(report: Report, seq_len: int) -> None:
    stage = report.stage("setup")
    modules = {}
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
            modules[name] = "ok"
        except Exception as err:
            modules[name] = f"missing ({one_line(err)})"
    for name in OPTIONAL_MODULES:  # looked up, not imported: the kernel children report fla's import errors
        modules[name] = "ok" if importlib.util.find_spec(name) is not None else "missing"
    stage["modules"] = modules
    stage["presets"] = []
    for name in TRAIN_PRESETS:
        try:
            stage["presets"].append(load_preset(name, seq_len))
        except Exception as err:
            stage["presets"].append(dict(preset=name, error=one_line(err)))
    missing = [name for name in REQUIRED_MODULES if modules[name] != "ok"]
    broken = [p["preset"] for p in stage["presets"] if "error" in p]
    stage["status"] = "ok" if not missing and not broken else "failed"
    stage["notes"] = ([f"required module missing: {name}" for name in missing]
                      + [f"{p['preset']}: {p['error']}" for p in stage["presets"] if "error" in p]
                      + [f"{name} not installed: no {what}" for name, what in OPTIONAL_MODULES.items()
                         if modules[name] != "ok"])
    report.save()


# ---- tests: pytest -m gpu ---------------------------------------------------------------------------

OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
OUTCOME_COUNTED_AS = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                      "XFAIL": "xfailed", "XPASS": "xpassed"}  # the words of pytest's closing line
NODE_ID = re.compile(r"(\S+\.py::\S+)")
SECTION_AFTER_RESULTS = re.compile(r"^=+ (FAILURES|ERRORS|short test summary info|warnings summary) =+")
FINAL_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")


def stage_tests(report: Report, budget: Budget, timeout_s: float, dry_run: bool, workers: int) -> None:
    stage = report.stage("tests")
    stage["budget_s"] = round(timeout_s, 1)
    xdist = importlib.util.find_spec("xdist") is not None
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider"]
    if dry_run:
        command += ["--collect-only", "-q"]
    else:
        command += ["-v"] + (["-n", str(workers)] if xdist and workers > 1 else [])
    stage["command"] = " ".join(command[1:])
    if not dry_run and not xdist:
        stage["notes"].append("pytest-xdist not installed: one process")
    counts, failed, collected = Counter(), [], []
    in_summary = False  # the sections after the results repeat test ids and outcomes: count each test once

    def on_line(line: str) -> None:
        nonlocal in_summary
        in_summary = in_summary or bool(SECTION_AFTER_RESULTS.match(line))
        if dry_run:
            if NODE_ID.match(line):
                collected.append(line.strip())
            return
        final = line.startswith("=") and FINAL_COUNT.search(line)
        if final:
            stage["counts"] = {word.rstrip("s") if word.startswith("error") else word: int(n)
                               for n, word in FINAL_COUNT.findall(line)}
            report.save()
            return
        outcome, nodeid = OUTCOME.search(line), NODE_ID.search(line)
        if in_summary or not outcome or not nodeid:
            return
        counts[OUTCOME_COUNTED_AS[outcome.group(1)]] += 1
        if outcome.group(1) in ("FAILED", "ERROR"):
            failed.append(nodeid.group(1))
        stage["counts"], stage["failed_tests"] = dict(counts), failed
        report.save()

    log(budget, f"tests: {stage['command']} (budget {timeout_s:.0f}s)")
    result = run_with_deadline(command, timeout_s, on_line)
    if dry_run:
        stage["collected"] = len(collected)
        stage["status"] = "ok" if result["returncode"] == 0 and collected else "failed"
        if stage["status"] != "ok":
            stage["notes"].append(f"collection: {last_error_line(result['tail'])}")
    elif result["timed_out"]:
        stage["status"] = "timeout"
        stage["notes"].append(f"stopped at its budget ({timeout_s:.0f}s); counts are of the tests that finished")
    elif result["returncode"] == 5:
        stage["status"] = "ok"
        stage["notes"].append("no test is marked gpu")
    else:
        stage["status"] = "ok" if result["returncode"] == 0 else "failed"
        if result["returncode"] not in (0, 1):
            stage["notes"].append(f"pytest exit {result['returncode']}: {last_error_line(result['tail'])}")
    report.save()
    log(budget, f"tests: {stage['status']} {stage.get('counts', stage.get('collected', ''))}")


# ---- kernels: ours vs fla vs SDPA, and ours vs the fp32 reference --------------------------------------

def our_ops() -> dict:
    from kernels import chunk_gated_delta_rule, chunk_gla
    return {"gla": chunk_gla, "gla_scalar": chunk_gla, "gated_delta_rule": chunk_gated_delta_rule}


def reference_ops() -> dict:
    """The chunked PyTorch paths (kernels' CPU path), run in fp32 on the inputs' device."""
    from kernels.gated_delta_rule.chunk import chunk_gated_delta_rule_torch
    from kernels.gla.chunk import chunk_gla_torch
    return {"gla": chunk_gla_torch, "gla_scalar": chunk_gla_torch, "gated_delta_rule": chunk_gated_delta_rule_torch}


def load_fla(op: str):
    """(fla's function, None), or (None, why not)."""
    module, name = FLA_OPS[op]
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as err:  # not installed, or refusing this triton / GPU at import
        return None, f"{module}.{name} unavailable: {one_line(err)}"


def time_ms(fn, inputs: dict, device: str) -> float:
    return time_gpu(fn, inputs) if device == "cuda" else 1e3 * time_cpu(fn, inputs, repeats=1)


def output_and_grads(fn, inputs: dict, upstream: torch.Tensor) -> dict:
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    o, _ = fn(**leaves)
    o.backward(upstream)
    return {"o": o.detach(), **{f"d{name}": x.grad for name, x in leaves.items()}}


def check_against_reference(op: str, inputs: dict) -> dict:
    """Ours on the bf16 inputs against the fp32 chunked reference on the same values, with one random upstream
    gradient: ||ours - ref|| / ||ref|| for o and every input's gradient."""
    upstream = torch.randn(inputs["v"].shape, generator=torch.Generator(inputs["v"].device).manual_seed(1),
                           device=inputs["v"].device).to(inputs["v"].dtype)
    ours = output_and_grads(our_ops()[op], inputs, upstream)
    expected = output_and_grads(reference_ops()[op], {n: x.float() for n, x in inputs.items()}, upstream.float())
    errors = {name: ((ours[name].float() - e).norm() / e.norm().clamp_min(1e-30)).item()
              for name, e in expected.items()}
    return dict(rel_errors=errors, max_rel_error=max(errors.values()),
                passed=all(e <= CHECK_TOLERANCE for e in errors.values()))


def kernel_child(op: str, shapes: list[tuple], device: str) -> None:
    """One op at every shape, small to large; one result line per shape on stdout as soon as it is measured."""
    torch.set_float32_matmul_precision("highest")  # the fp32 reference in fp32, not TF32
    fla_fn, fla_reason = (None, None) if op == "sdpa" else load_fla(op)
    if device != "cuda" and fla_fn is not None:
        fla_fn, fla_reason = None, "fla's Triton kernels need a GPU (dry run)"
    for B, T, H, D in shapes:
        row = dict(op=op, shape=f"{B}x{T}x{H}x{D}", B=B, T=T, H=H, D=D)
        inputs = None
        try:
            inputs = make_inputs("gla" if op == "sdpa" else op, B, T, H, D, torch.bfloat16, device)
            if op == "sdpa":
                row["sdpa_ms"] = time_ms(sdpa_causal, {n: inputs[n] for n in ("q", "k", "v")}, device)
            else:
                row["ours_ms"] = time_ms(our_ops()[op], inputs, device)
                row["check"] = check_against_reference(op, inputs)
        except Exception as err:  # a kernel error (or a dead CUDA context) ends nothing but this row
            row["error"] = one_line(err)
        if op != "sdpa":
            if fla_fn is None:
                row["fla_error"] = fla_reason
            elif inputs is not None:
                try:
                    row["fla_ms"] = time_ms(fla_fn, inputs, device)
                except Exception as err:  # e.g. fla 0.6.0's backward on Hopper with triton < 3.7.1
                    row["fla_error"] = one_line(err)
        print(ROW_PREFIX + json.dumps(row), flush=True)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()


def stage_kernels(report: Report, budget: Budget, timeout_s: float, dry_run: bool) -> None:
    stage = report.stage("kernels")
    stage["budget_s"] = round(timeout_s, 1)
    stage["tolerance"] = CHECK_TOLERANCE
    device = "cpu" if dry_run else "cuda"
    shapes = DRY_RUN_SHAPES if dry_run else GPU_SHAPES
    stage_deadline = time.perf_counter() + timeout_s
    statuses = []
    for i, op in enumerate(KERNEL_OPS):
        op_budget = (stage_deadline - time.perf_counter()) / (len(KERNEL_OPS) - i)
        command = [sys.executable, "-m", "bench.gpu_check", "--kernel-child", op, "--device", device,
                   "--shapes", *(f"{B}x{T}x{H}x{D}" for B, T, H, D in shapes)]

        def on_line(line: str) -> None:
            if line.startswith(ROW_PREFIX):
                row = json.loads(line[len(ROW_PREFIX):])
                stage["rows"].append(row)
                report.save()
                log(budget, f"kernels: {describe_kernel_row(row)}")

        log(budget, f"kernels: {op} (budget {op_budget:.0f}s)")
        result = run_with_deadline(command, op_budget, on_line)
        done = sum(row["op"] == op for row in stage["rows"])
        if result["timed_out"]:
            statuses.append("timeout")
            stage["notes"].append(f"{op}: stopped at its budget ({op_budget:.0f}s) after {done} of {len(shapes)} "
                                  "shapes")
        elif result["returncode"] != 0 or done < len(shapes):
            statuses.append("error")
            stage["notes"].append(f"{op}: exit {result['returncode']} after {done} of {len(shapes)} shapes: "
                                  f"{last_error_line(result['tail'])}")
        report.save()
    ours = [row for row in stage["rows"] if row["op"] != "sdpa"]
    # None when nothing was checked (no time); a row whose kernel raised counts as failed
    stage["check_passed"] = all(row.get("check", {}).get("passed", False) for row in ours) if ours else None
    stage["status"] = ("failed" if stage["check_passed"] is False else "error" if "error" in statuses
                       else "timeout" if statuses else "ok")
    for op, reason in sorted({(row["op"], row["fla_error"]) for row in ours if "fla_error" in row}):
        stage["notes"].append(f"{op}: {reason}")
    report.save()


def describe_kernel_row(row: dict) -> str:
    parts = [f"{row['op']} {row['shape']}"]
    parts += [f"{name} {row[f'{name}_ms']:.3g} ms" for name in ("ours", "fla", "sdpa") if f"{name}_ms" in row]
    if "check" in row:
        parts.append(f"max rel err {row['check']['max_rel_error']:.2e} {'ok' if row['check']['passed'] else 'FAIL'}")
    parts += [f"{key} {row[key]}" for key in ("error", "fla_error") if key in row]
    return ", ".join(parts)


# ---- training: train.py on the 370M presets ---------------------------------------------------------

def train_command(preset: str, run_dir: Path, args) -> list[str]:
    overrides = [f"model={preset}", "data=mqar", f"data.vocab_size={args.train_vocab}",
                 f"train.seq_len={args.seq_len}", f"train.global_batch_size={args.train_batch}",
                 f"train.max_steps={args.train_steps}", "train.checkpoint_every=0",
                 f"train.log_every={args.train_steps}", "eval.tasks=[]", "eval.sample_tokens=0",
                 "logging.wandb.mode=disabled", f"run.dir={run_dir}"]
    return [sys.executable, str(REPO / "train.py"), *overrides, *(DRY_RUN_WIDTH if args.dry_run else [])]


def summarise_steps(records: list[dict], warmup: int, tokens_per_step: int) -> dict:
    """Median step after warm-up, and tokens/s, MFU and peak memory as train.py logged them."""
    measured = [r for r in records if r["step"] > warmup]
    if not measured:
        return dict(steps_done=len(records))
    seconds = statistics.median(tokens_per_step / r["tokens_per_s"] for r in measured)
    summary = dict(steps_done=len(records), steps_measured=len(measured), median_step_s=round(seconds, 4),
                   tokens_per_s=round(tokens_per_step / seconds), peak_mem_gib=max(r["peak_mem_gib"] for r in records))
    if all("mfu" in r for r in measured):  # train.py's MFU (flops per token x tokens/s / peak): the median step's
        summary["mfu"] = round(statistics.median(r["mfu"] for r in measured), 4)
    return summary


def stage_training(report: Report, budget: Budget, timeout_s: float, args) -> None:
    stage = report.stage("training")
    stage["budget_s"] = round(timeout_s, 1)
    tokens_per_step = args.train_batch * args.seq_len
    stage["settings"] = dict(seq_len=args.seq_len, global_batch_size=args.train_batch, steps=args.train_steps,
                             warmup_steps=args.train_warmup, vocab_size=args.train_vocab, data="mqar (random rows)")
    stage_deadline = time.perf_counter() + timeout_s
    statuses = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for i, preset in enumerate(TRAIN_PRESETS):
            row = dict(preset=preset)
            stage["rows"].append(row)
            if not (REPO / "configs" / "model" / f"{preset}.yaml").exists():
                row["error"] = f"no preset configs/model/{preset}.yaml"
                statuses.append("error")
                continue
            preset_budget = (stage_deadline - time.perf_counter()) / (len(TRAIN_PRESETS) - i)
            metrics = Path(tmp) / preset / "metrics.jsonl"

            def read_steps() -> list[dict]:  # the steps train.py has logged so far, copied into the JSON
                lines = metrics.read_text().splitlines() if metrics.exists() else []
                records = [json.loads(line) for line in lines if line.endswith("}")]  # a line being written: later
                row.update(summarise_steps(records, args.train_warmup, tokens_per_step))
                report.save()
                return records

            log(budget, f"training: {preset} (budget {preset_budget:.0f}s)")
            result = run_with_deadline(train_command(preset, metrics.parent, args), preset_budget, poll=read_steps)
            records = read_steps()
            row["seconds"] = result["seconds"]
            if result["timed_out"]:
                row["error"] = f"stopped at its budget ({preset_budget:.0f}s) after {len(records)} steps"
            elif result["returncode"] != 0:
                row["error"] = f"exit {result['returncode']}: {last_error_line(result['tail'])}"
            elif "tokens_per_s" not in row:
                row["error"] = f"no step after the {args.train_warmup} warm-up steps"
            if "error" in row:
                statuses.append("timeout" if result["timed_out"] else "error")
            report.save()
            log(budget, f"training: {preset}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "preset"))
    stage["status"] = "error" if "error" in statuses else "timeout" if statuses else "ok"
    report.save()


# ---- tables -------------------------------------------------------------------------------------------

def kernel_table(rows: list[dict]) -> list[dict]:
    sdpa = {row["shape"]: row.get("sdpa_ms") for row in rows if row["op"] == "sdpa"}
    table = []
    for row in rows:
        if row["op"] == "sdpa":
            continue
        ours, fla, attention = row.get("ours_ms"), row.get("fla_ms"), sdpa.get(row["shape"])
        check = row.get("check")
        table.append({"op": row["op"], "B x T x H x K": row["shape"],
                      "ours ms": ours if ours is not None else "error",
                      "fla ms": fla if fla is not None else "n/a",
                      "sdpa ms": attention if attention is not None else "n/a",
                      "ours/fla": ours / fla if ours and fla else "",
                      "ours/sdpa": ours / attention if ours and attention else "",
                      "max rel err": check["max_rel_error"] if check else "",
                      "check": ("ok" if check["passed"] else "FAIL") if check else "FAIL: raised"})
    return table


def training_table(rows: list[dict], presets: list[dict]) -> list[dict]:
    params = {p["preset"]: p.get("params_m") for p in presets}
    table = []
    for row in rows:
        mfu = row.get("mfu")
        table.append({"preset": row["preset"], "params M": params.get(row["preset"], ""),
                      "tokens/s": row.get("tokens_per_s", ""),
                      "MFU %": 100 * mfu if mfu is not None else "n/a",
                      "peak GiB": row.get("peak_mem_gib", ""), "median step s": row.get("median_step_s", ""),
                      "steps": row.get("steps_done", ""), "note": row.get("error", "")})
    return table


def print_report(data: dict, path: Path) -> None:
    print(f"\nGPU check{' (dry run)' if data['dry_run'] else ''}: {data['device']['device']}, "
          + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)
          + f"; commit {data['git'].get('commit') or 'unknown'}; {data['date']}; "
          f"{data['elapsed_s']:.0f}s of a {data['budget_s']:.0f}s budget")
    stages = data["stages"]
    print_table("Stages", [{"stage": name, "status": stage["status"], "seconds": stage.get("seconds", ""),
                            "budget s": stage.get("budget_s", "")} for name, stage in stages.items()])
    tests = stages["tests"]
    if tests.get("counts") or tests.get("collected") is not None:
        print(f"\nGPU tests (pytest -m gpu): {tests.get('counts') or str(tests.get('collected')) + ' collected'}"
              + "".join(f"\n  failed: {name}" for name in tests.get("failed_tests", [])))
    print_table("Kernels, forward + backward in bf16 (ms); check: ours against the fp32 chunked reference "
                f"(||ours - ref|| / ||ref||, o and every gradient, <= {CHECK_TOLERANCE:g})",
                kernel_table(stages["kernels"]["rows"]))
    settings = stages["training"].get("settings", {})
    print_table(f"Training, {settings.get('global_batch_size')} x {settings.get('seq_len')} tokens per step, median "
                f"step after {settings.get('warmup_steps')} warm-up steps",
                training_table(stages["training"]["rows"], stages["setup"].get("presets", [])))
    notes = [f"{name}: {note}" for name, stage in stages.items() for note in stage.get("notes", [])]
    if notes:
        print("\nNot done or not as planned:\n" + "\n".join(f"  {note}" for note in notes))
    print(f"\nresults written to {path}")


# ---- main ------------------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        B, T, H, D = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BxTxHxD, e.g. 8x2048x16x128") from None
    return B, T, H, D


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=360.0, help="the whole command's time budget (seconds)")
    parser.add_argument("--dry-run", action="store_true", help="on CPU: every step short of the GPU, at tiny shapes")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON")
    parser.add_argument("--test-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="pytest-xdist processes (when installed)")
    parser.add_argument("--seq-len", type=int, help=f"training sequence length (default {TRAINING['seq_len']})")
    parser.add_argument("--train-batch", type=int,
                        help=f"sequences per training step (default {TRAINING['train_batch']})")
    parser.add_argument("--train-steps", type=int,
                        help=f"training steps per preset, warm-up included (default {TRAINING['train_steps']})")
    parser.add_argument("--train-warmup", type=int,
                        help=f"steps left out of the median (default {TRAINING['train_warmup']})")
    parser.add_argument("--fresh-triton-cache", action="store_true",
                        help="compile into an empty Triton cache (TRITON_CACHE_DIR): the cold-cache duration")
    parser.add_argument("--kernel-child", choices=KERNEL_OPS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernel_child:
        kernel_child(args.kernel_child, args.shapes, args.device)
        return 0
    if args.budget_s <= FINISH_MARGIN_S or args.test_workers < 1:
        parser.error(f"--budget-s must exceed {FINISH_MARGIN_S:g} and --test-workers be at least 1")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --dry-run on CPU")
    for name, value in (DRY_RUN_TRAINING if args.dry_run else TRAINING).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the children are killed too
    if not 0 <= args.train_warmup < args.train_steps:
        parser.error(f"--train-warmup {args.train_warmup} must be below --train-steps {args.train_steps}")

    budget = Budget(args.budget_s)
    if args.fresh_triton_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_check_triton_")
    info = device_info()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    kind = "dryrun" if args.dry_run else re.sub(r"\W+", "_", info["device"]).strip("_").lower()
    path = args.out / f"gpu_check_{kind}_{stamp}.json"
    data = dict(command=" ".join(["python -m bench.gpu_check", *sys.argv[1:]]), dry_run=args.dry_run,
                device=info, git=git_commit(),
                versions=dict(versions(), cuda=torch.version.cuda, pytest=package_version("pytest"),
                              pytest_xdist=package_version("pytest-xdist")),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                environment={k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
                budget_s=args.budget_s, elapsed_s=0.0, finished=False, numerical_check_passed=None,
                stages={name: dict(status="not run", notes=[], rows=[]) for name in ("setup",) + STAGES})
    for name in ("setup", "tests"):
        del data["stages"][name]["rows"]
    report = Report(path, data)
    report.save()
    log(budget, f"GPU check{' (dry run)' if args.dry_run else ''} on {info['device']}: writing {path}")

    started = time.perf_counter()
    stage_setup(report, args.seq_len)
    data["stages"]["setup"]["seconds"] = round(time.perf_counter() - started, 1)
    log(budget, f"setup: {report.stage('setup')['status']}")
    selected = [stage for stage in STAGES if stage in args.stages]
    for i, stage in enumerate(selected):
        timeout_s = budget.for_stage(stage, selected[i:])
        started = time.perf_counter()
        if stage == "tests":
            stage_tests(report, budget, timeout_s, args.dry_run, args.test_workers)
        elif stage == "kernels":
            stage_kernels(report, budget, timeout_s, args.dry_run)
        else:
            stage_training(report, budget, timeout_s, args)
        data["stages"][stage]["seconds"] = round(time.perf_counter() - started, 1)
        data["elapsed_s"] = round(budget.elapsed(), 1)
        report.save()
    for stage in STAGES:
        if stage not in selected:
            data["stages"][stage]["status"] = "skipped"
            data["stages"][stage]["notes"].append("not selected (--stages)")
    kernels = data["stages"]["kernels"]
    if "kernels" in selected:
        data["numerical_check_passed"] = kernels["check_passed"]
    if args.dry_run:
        data["dry_run_passed"] = all(stage["status"] == "ok" for stage in data["stages"].values())
    data["elapsed_s"], data["finished"] = round(budget.elapsed(), 1), True
    report.save()
    print_report(data, path)
    return 1 if data["numerical_check_passed"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
