"""Benchmark the recurrent kernels: forward + backward time.

CPU: the chunked PyTorch path against the naive loop over time (the speedup every CPU test and the
default CPU run get). GPU (only when CUDA is available): our Triton chunk_gla (vector and scalar gate)
and chunk_gated_delta_rule against flash-linear-attention's same ops (when `fla` is installed) and
torch SDPA causal attention (flash backend), bf16, at the shapes of issue 3.
Prints a table and writes JSON (device, versions, date, results) to bench/results/.

    python -m bench.kernels                 # CPU part (and the GPU part when there is a GPU)
    python -m bench.kernels --cpu-lengths 512 2048 --naive-max-length 2048 --threads 1
"""
import argparse
import platform
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.common import print_table, write_results
from kernels.gated_delta_rule.chunk import chunk_gated_delta_rule_torch
from kernels.gated_delta_rule.naive import naive_gated_delta_rule
from kernels.gla.chunk import chunk_gla_torch
from kernels.gla.naive import naive_recurrent_gla

GPU_SHAPES = [(8, 2048, 16, 128), (4, 8192, 16, 128), (1, 32768, 16, 128)]  # (B, T, H, K = V)


def make_inputs(op: str, B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict:
    """Leaf tensors for one op: 'gla' (vector gate), 'gla_scalar' or 'gated_delta_rule'."""
    gen = torch.Generator(device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    if op == "gated_delta_rule":  # the caller L2-normalises q and k
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = dict(g=F.logsigmoid(rand(B, T, H)), beta=torch.sigmoid(rand(B, T, H)))
    elif op == "gla_scalar":
        gates = dict(g=F.logsigmoid(rand(B, T, H) + 4))
    else:
        gates = dict(g=F.logsigmoid(rand(B, T, H, D) + 4) / 4)
    inputs = dict(q=q, k=k, v=v, **gates)
    return {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}


def forward_backward(fn, inputs: dict) -> None:
    o = fn(**inputs)
    o = o[0] if isinstance(o, tuple) else o
    o.backward(torch.ones_like(o))


def time_cpu(fn, inputs: dict, repeats: int) -> float:
    """Best of `repeats` wall-clock seconds for one forward + backward."""
    best = float("inf")
    for _ in range(repeats):
        for x in inputs.values():
            x.grad = None
        start = time.perf_counter()
        forward_backward(fn, inputs)
        best = min(best, time.perf_counter() - start)
    return best


def time_gpu(fn, inputs: dict) -> float:
    """Median milliseconds of forward + backward (triton.testing.do_bench: warmed up, L2 flushed)."""
    from triton.testing import do_bench
    return do_bench(lambda: forward_backward(fn, inputs), warmup=25, rep=100, grad_to_none=list(inputs.values()),
                    return_mode="median")


CPU_OPS = {
    "gla": (chunk_gla_torch, naive_recurrent_gla),
    "gla_scalar": (chunk_gla_torch, naive_recurrent_gla),
    "gated_delta_rule": (chunk_gated_delta_rule_torch, naive_gated_delta_rule),
}


def bench_cpu(lengths: list[int], naive_max_length: int, heads: int, dim: int, repeats: int) -> list[dict]:
    rows = []
    cases = [(op, T) for op in CPU_OPS for T in lengths]
    for op, T in tqdm(cases, desc="cpu"):
        chunked, naive = CPU_OPS[op]
        inputs = make_inputs(op, 1, T, heads, dim, torch.float32, "cpu")
        row = dict(op=op, B=1, T=T, H=heads, K=dim, V=dim, dtype="float32",
                   chunked_s=time_cpu(chunked, inputs, repeats))
        if T <= naive_max_length:  # the naive loop is one Python step per token: minutes at long T
            row["naive_s"] = time_cpu(naive, inputs, 1)
            row["speedup"] = row["naive_s"] / row["chunked_s"]
        rows.append(row)
    return rows


def gpu_ops() -> dict:
    from kernels import chunk_gated_delta_rule, chunk_gla
    ops = {"gla": {"ours": chunk_gla}, "gla_scalar": {"ours": chunk_gla},
           "gated_delta_rule": {"ours": chunk_gated_delta_rule}}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gated_delta_rule
        from fla.ops.gla import chunk_gla as fla_gla
        from fla.ops.simple_gla import chunk_simple_gla as fla_simple_gla
        ops["gla"]["fla"], ops["gla_scalar"]["fla"] = fla_gla, fla_simple_gla
        ops["gated_delta_rule"]["fla"] = fla_gated_delta_rule
    except ImportError:
        print("flash-linear-attention (fla) is not installed: no FLA comparison")
    return ops


def sdpa_causal(q, k, v, **gates):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)


def bench_gpu(dtype: torch.dtype) -> list[dict]:
    rows = []
    ops = gpu_ops()
    cases = [(op, shape) for op in ops for shape in GPU_SHAPES]
    for op, (B, T, H, D) in tqdm(cases, desc="gpu"):
        inputs = make_inputs(op, B, T, H, D, dtype, "cuda")
        row = dict(op=op, B=B, T=T, H=H, K=D, V=D, dtype=str(dtype).removeprefix("torch."))
        for name, fn in ops[op].items():
            row[f"{name}_ms"] = time_gpu(fn, inputs)
        if "fla_ms" in row:
            row["ours_over_fla"] = row["ours_ms"] / row["fla_ms"]
        attention_inputs = {n: inputs[n] for n in ("q", "k", "v")}
        row["sdpa_ms"] = time_gpu(sdpa_causal, attention_inputs)
        row["ours_over_sdpa"] = row["ours_ms"] / row["sdpa_ms"]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--naive-max-length", type=int, default=8192, help="skip the naive loop above this T")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="K = V on the CPU")
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats for the chunked path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, " \
                                                        f"{torch.get_num_threads()} threads)"
    results = dict(device=device, cpu=[], gpu=[])
    if not args.skip_cpu:
        results["cpu"] = bench_cpu(args.cpu_lengths, args.naive_max_length, args.heads, args.dim, args.repeats)
        print_table("CPU, forward + backward: chunked PyTorch vs naive loop (seconds)", results["cpu"])
    if cuda:
        for dtype in (torch.bfloat16,):
            results["gpu"] += bench_gpu(dtype)
        print_table("GPU, forward + backward (ms): ours vs flash-linear-attention vs SDPA", results["gpu"])
    else:
        print("\nno CUDA device: GPU benchmark skipped")
    write_results(f"kernels_{'cuda' if cuda else 'cpu'}", results)


if __name__ == "__main__":
    main()
