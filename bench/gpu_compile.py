"""Compile every Triton kernel of kernels/ for real GPU targets, on a machine without a GPU.

The public Triton entry points run forward and backward on small CPU tensors at the presets' head dims inside
kernels.compile_check.compile_only (a compile-only driver for sm_80, sm_90 or sm_100), so exactly the kernels
and autotune candidates training would launch on that architecture get compiled, and each compiled kernel
gives its registers, stack (register spills) and shared memory.

A kernel passes on a target when it compiles and at least one config fits the target's shared memory
without spilling. The table (op, dtype, target, K, V, kernel, registers, stack, shared bytes, configs that
fit / compiled) is printed and saved as JSON under bench/results/; the exit status is 1 when a kernel fails.

    python -m bench.gpu_compile                       # all targets, presets' shapes, bf16 and fp32
    python -m bench.gpu_compile --quick               # the CI set (tests/kernels/test_gpu_compile.py)
    python -m bench.gpu_compile --targets sm_90 --ops gated_delta_rule --shapes 256x512 128x64 --dtypes bf16
    python -m bench.gpu_compile --count               # compiled variants of each op's first training call

Configs: by default every candidate the architecture tries is compiled (what autotuning on the GPU does).
--quick stops at each kernel's first candidate that fits and does not spill (the heuristic config comes
first), which gives the same verdict for a fraction of the compiles. --count compiles nothing: it counts the
variants the first forward+backward of each op's chunk entry point at a new shape compiles on each target
(every candidate of every kernel launched), and fails above MAX_VARIANTS_PER_OP.

Run with TRITON_INTERPRET unset (Triton decides at decoration time whether a kernel is interpreted).
"""
import argparse
import contextlib
import glob
import itertools
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from bench.common import REPO, write_results
from kernels import rms_norm, rotate_rows
from kernels.compile_check import TARGETS, CompileLog, Compiled, compile_only, failures
from model.registry import MIXERS

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The recurrent mixers' kernel ops (model/registry.py: 'gla_scalar' is chunk_gla with a [B, T, H] gate, Mamba2's),
# the short convolution every recurrent mixer runs ('conv', whose shape is (channels, width)), the RMSNorm of
# every block ('norm', shape (width, 1)) and a decode step's rotary embedding ('rotary', shape (heads, head dim)).
# 'block_diagonal_scan' is the ParaRNN LSTM's through (h, c) (model.pararnn.lstm = hc or cifg), shape (channels, 2).
OPS = sorted({*(mixer.core.kernel for mixer in MIXERS.values() if mixer.recurrent), "block_diagonal_scan", "conv",
              "norm", "rotary"})
CONV_CHANNELS = 1024  # the kernels block channels by 32-128 and are keyed on (channels, width): any size will do


def preset_shapes() -> dict[str, list[tuple[int, int]]]:
    """(K, V) head dims of every recurrent mixer of the model presets (configs/model), by op; the norm's widths
    (the residual stream's, the recurrent mixers' output norms') and the rotary's heads (queries and keys)."""
    from omegaconf import OmegaConf

    from model.config import ModelConfig
    shapes: dict[str, set] = {op: set() for op in OPS}
    for path in sorted(glob.glob(str(REPO / "configs" / "model" / "*.yaml"))):
        c = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
        shapes["norm"].add((c.d_model, 1))
        for mixer in (MIXERS[name] for name in set(c.layer_mixers())):
            if mixer.recurrent:
                K, V = mixer.head_dims(c)
                if mixer.name == "mlstm":  # its state (C | n | m) has V + 2 columns: the op's V is the values'
                    V -= 2
                shapes[mixer.core.kernel].add((K, V))
                if mixer.name == "pararnn_lstm":  # the presets' LSTM width, as the (h, c) cell would run it
                    shapes["block_diagonal_scan"].add((K, 2))
                settings = getattr(c, mixer.config_key)
                if hasattr(settings, "conv_size"):  # ParaRNN's cells have no short convolution
                    shapes["conv"].add((CONV_CHANNELS, settings.conv_size))
                # the output norm: Mamba2's over its whole inner width, the others' over each value head
                width = c.mamba2.expand * c.d_model if mixer.name == "mamba2" else V
                shapes["norm"].add((width, 1))
            else:
                a = c.attention
                heads = a.num_heads + (a.num_kv_heads or a.num_heads)
                shapes["rotary"].add((heads, a.head_dim or c.d_model // a.num_heads))
    return {op: sorted(s) for op, s in shapes.items()}


# ---- the ops, through their public Triton entry points --------------------------------------------

def _inputs(op: str, K: int, V: int, dtype: torch.dtype, B: int = 1, T: int = 64, H: int = 2) -> dict:
    rand = lambda *shape: torch.randn(*shape)  # noqa: E731
    if op == "diagonal_scan":  # a state per channel: K channels per head (its head dims are (K, 1))
        inputs = dict(a=torch.tanh(rand(B, T, H, K)).to(dtype).requires_grad_(),
                      b=rand(B, T, H, K).to(dtype).requires_grad_())
        return dict(inputs, initial_state=torch.randn(B, H, K, requires_grad=True))
    if op == "block_diagonal_scan":  # (h, c) per channel: K channels per head, 2x2 blocks
        inputs = dict(a=(0.5 * torch.tanh(rand(B, T, H, K, 2, 2))).to(dtype).requires_grad_(),
                      b=rand(B, T, H, K, 2).to(dtype).requires_grad_())
        return dict(inputs, initial_state=torch.randn(B, H, K, 2, requires_grad=True))
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    if op == "gated_delta_rule":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = dict(g=F.logsigmoid(rand(B, T, H)), beta=torch.sigmoid(rand(B, T, H)))
    elif op == "mlstm":  # the input gate's log and the forget gate's; the state (C | n | m) has V + 2 columns
        gates = dict(i=rand(B, T, H), f=F.logsigmoid(rand(B, T, H)))
    else:
        gates = dict(g=F.logsigmoid(rand(B, T, H) if op == "gla_scalar" else rand(B, T, H, K)))
    inputs = dict(q=q, k=k, v=v, **gates)
    inputs = {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}
    inputs["initial_state"] = torch.randn(B, H, K, V + 2 if op == "mlstm" else V, requires_grad=True)
    return inputs


def _entry_points(op: str):
    """(chunk, fused recurrent) Triton entry points of an op; the convolution has one."""
    if op == "conv":
        from kernels import causal_conv1d
        return (causal_conv1d,)
    if op == "diagonal_scan":
        from kernels.diagonal_scan.fused_recurrent import fused_recurrent_diagonal_scan_triton
        from kernels.diagonal_scan.triton_scan import chunk_diagonal_scan_triton
        return chunk_diagonal_scan_triton, fused_recurrent_diagonal_scan_triton
    if op == "block_diagonal_scan":
        from kernels.block_diagonal_scan.fused_recurrent import fused_recurrent_block_diagonal_scan_triton
        from kernels.block_diagonal_scan.triton_scan import chunk_block_diagonal_scan_triton
        return chunk_block_diagonal_scan_triton, fused_recurrent_block_diagonal_scan_triton
    if op == "mlstm":  # GLA's chunk kernels on the stabilised gates, and the mLSTM's own step (forward only)
        from kernels.mlstm import chunk_mlstm
        from kernels.mlstm.fused_recurrent import fused_recurrent_mlstm_triton

        def chunk_mlstm_triton(**inputs):
            with mock.patch("kernels.gla.use_triton", lambda x: True):  # CPU tensors, compiled kernels
                return chunk_mlstm(**inputs)
        return chunk_mlstm_triton, fused_recurrent_mlstm_triton
    if op == "gated_delta_rule":
        from kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_triton
        from kernels.gated_delta_rule.triton_chunk import chunk_gated_delta_rule_triton
        return chunk_gated_delta_rule_triton, fused_recurrent_gated_delta_rule_triton
    from kernels.gla.fused_recurrent import fused_recurrent_gla_triton
    from kernels.gla.triton_chunk import chunk_gla_triton
    return chunk_gla_triton, fused_recurrent_gla_triton


def run_op(op: str, K: int, V: int, dtype: torch.dtype, chunk_only: bool = False) -> None:
    """Forward (chunk and, unless chunk_only, fused recurrent, with initial and final state) and backward of
    one op."""
    if op == "norm":  # 64 rows of K, plain and gated before and after the norm (the backward is PyTorch's)
        x, gate, weight = torch.randn(64, K, dtype=dtype), torch.randn(64, K, dtype=dtype), torch.randn(K)
        with mock.patch("kernels.norm.use_triton", lambda x: True):
            for gate_, before in ((None, True), (gate, True), (gate, False)):
                rms_norm(x, weight, 1e-5, dtype, gate_, before)
        return
    if op == "rotary":  # a decode step's K heads of dim V, two rows (forward only: decoding)
        with mock.patch("kernels.rotary.use_triton", lambda x: True):
            rotate_rows(torch.randn(2, K, V, dtype=dtype), torch.tensor([3, 700]), torch.rand(V))
        return
    if op == "conv":  # K channels, width V, two packed documents with initial states
        x = torch.randn(1, 64, K, dtype=dtype, requires_grad=True)
        weight, bias, state = torch.randn(K, V), torch.randn(K), torch.randn(2, K, V - 1)
        with mock.patch("kernels.conv.function.use_triton", lambda x: True):  # CPU tensors, compiled kernels
            y, final = _entry_points(op)[0](x, weight, bias, "silu", state, output_final_state=True,
                                            cu_seqlens=torch.tensor([0, 37, 64], dtype=torch.int32))
            torch.autograd.backward([y, final], [torch.ones_like(y), torch.ones_like(final)])
        return
    for fn in _entry_points(op)[:1 if chunk_only else 2]:
        o, final = fn(**_inputs(op, K, V, dtype), output_final_state=True)
        if o.requires_grad:  # the mLSTM's step kernel is forward only (decoding)
            torch.autograd.backward([o, final], [torch.ones_like(o), torch.ones_like(final)])


MAX_VARIANTS_PER_OP = 40  # compiles of an op's first forward+backward at a new shape, every candidate included


def count_variants(case: dict) -> dict:
    """The case with `variants`: how many kernel variants the first chunk forward+backward compiles there."""
    with compile_only(case["target"], count_only=True) as log:
        run_op(case["op"], case["K"], case["V"], DTYPES[case["dtype"]], chunk_only=True)
    return dict(case, variants=len(log.variants),
                per_kernel={name: sum(c.kernel == name for c in log.variants.values())
                            for name in sorted({c.kernel for c in log.variants.values()})})


# ---- the check ------------------------------------------------------------------------------------

def check_case(case: dict, quick: bool) -> list[dict]:
    """One row per kernel of a case (a dict of target, op, dtype, K and V): the best config's resources and the
    configs that fit; a compile error is one row saying so (it fails the check, the other cases still run)."""
    try:
        with compile_only(case["target"], quick) as log:
            run_op(case["op"], case["K"], case["V"], DTYPES[case["dtype"]])
    except Exception as e:
        return [dict(case, kernel="-", error=f"{type(e).__name__}: {e}".splitlines()[0])]
    return _summarise(case, log)


def check(cases: list[dict], quick: bool, jobs: int = 1) -> list[dict]:
    """The rows of every case, printed as they come. With jobs > 1 the cases run in that many processes
    (compiling is single-threaded; compile_only patches Triton for its whole process, so one case each)."""
    rows = []
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                           max_tasks_per_child=1))
            results = pool.map(check_case, cases, itertools.repeat(quick))
        else:
            results = map(check_case, cases, itertools.repeat(quick))
        for case_rows in results:
            print(_format_rows(case_rows), flush=True)
            rows += case_rows
    return rows


def quick_cases(shapes: dict, targets=tuple(TARGETS), dtypes=("bf16",)) -> list[dict]:
    """The CI set: every target (sm_80, sm_90, sm_100), bf16 (what training feeds the kernels), each op at its
    largest preset shape (the most registers and shared memory; GLA and Gated DeltaNet K=256, V=512, Mamba2
    K=128, V=64). fp32 inputs (exact fp32 dots, no tensor cores) spill at these shapes: see the README."""
    return [dict(target=t, op=op, dtype=d, K=K, V=V) for t in targets for d in dtypes
            for op, s in shapes.items() for K, V in [max(s, key=lambda kv: kv[0] * kv[1])]]


def _summarise(case: dict, log: CompileLog) -> list[dict]:
    by_kernel: dict[str, list[Compiled]] = {}
    for c in log.variants.values():
        by_kernel.setdefault(c.kernel, []).append(c)
    rows = []
    for kernel, variants in sorted(by_kernel.items()):
        fitting = [c for c in variants if c.fits]
        best = min(fitting or variants, key=lambda c: (not c.fits, c.stack, c.registers, c.shared))
        rows.append(dict(case, kernel=kernel, config=best.config, registers=best.registers, stack=best.stack,
                         shared=best.shared, fit=len(fitting), spill_free=sum(c.stack == 0 for c in fitting),
                         compiled=len(variants), max_stack=max(c.stack for c in fitting) if fitting else None,
                         max_shared=max(c.shared for c in variants),
                         variants=[asdict(c) for c in variants]))
    return rows


def _format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['target']:7}{r['op']:17}{r['dtype']:5}{r['K']:>4}x{r['V']:<4} ERROR {r['error']}")
            continue
        lines.append(f"{r['target']:7}{r['op']:17}{r['dtype']:5}{r['K']:>4}x{r['V']:<4} {r['kernel']:34}"
                     f"{r['registers']:>5}{r['stack']:>7}{r['shared']:>8}  {r['spill_free']:>2}/{r['fit']:>2}/"
                     f"{r['compiled']:<3} {r['config']}")
    return "\n".join(lines)


HEADER = (f"{'target':7}{'op':17}{'dtype':5}{'K x V':10}{'kernel':34}{'regs':>5}{'stack':>7}{'shared':>8}"
          "  spill-free/fit/compiled, best config")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 and fp32 (--quick: bf16)")
    p.add_argument("--shapes", nargs="+", metavar="KxV", help="head dims for every op (default: the presets')")
    p.add_argument("--quick", action="store_true",
                   help="the CI set (see quick_cases), stopping at each kernel's first config that fits unspilled")
    p.add_argument("--count", action="store_true",
                   help="count the compiled variants of each op's first training call per target (no compiling)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="cases compiled at once (default: one per core)")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/gpu_compile_<date>.json)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("TRITON_INTERPRET is set: compiled kernels need it unset")
    try:
        shapes = ({op: [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes] for op in args.ops}
                  if args.shapes else preset_shapes())
    except ValueError:
        p.error(f"--shapes takes KxV pairs such as 256x512, got {args.shapes}")
    if args.quick:
        cases = quick_cases({op: shapes[op] for op in args.ops}, args.targets, args.dtypes or ("bf16",))
    else:
        cases = [dict(target=t, op=op, dtype=d, K=K, V=V) for t in args.targets for op in args.ops
                 for d in args.dtypes or DTYPES for K, V in shapes[op]]

    if args.count:
        return _count(quick_cases({op: shapes[op] for op in args.ops}, args.targets, args.dtypes or ("bf16",)),
                      args.out)
    print(HEADER, flush=True)
    rows = check(cases, quick=args.quick, jobs=args.jobs)
    write_results("gpu_compile", dict(quick=args.quick, rows=rows,
                                      max_shared={t: TARGETS[t][1] for t in sorted({c["target"] for c in cases})}),
                  path=args.out)
    bad = failures(rows)
    for line in bad:
        print(f"FAIL {line}")
    return 1 if bad else 0


def _count(cases: list[dict], out: Path | None) -> int:
    rows = [count_variants(case) for case in cases]
    for r in rows:
        print(f"{r['target']:7}{r['op']:17}{r['dtype']:5}{r['K']:>4}x{r['V']:<4} {r['variants']:>4} variants  "
              + " ".join(f"{name}:{n}" for name, n in r["per_kernel"].items()), flush=True)
    write_results("gpu_compile_count", dict(max_variants_per_op=MAX_VARIANTS_PER_OP, rows=rows), path=out)
    over = [r for r in rows if r["variants"] > MAX_VARIANTS_PER_OP]
    for r in over:
        print(f"FAIL {r['op']} {r['target']}: {r['variants']} variants > {MAX_VARIANTS_PER_OP}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
