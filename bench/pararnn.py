"""ParaRNN on CPU: the Newton solver (model/pararnn.py, one diagonal scan per iteration) against the cell stepped
token by token, forward and forward + backward, for the GRU and LSTM cells at T = 512, 2048, 8192.

    python -m bench.pararnn                                   # the README's table
    python -m bench.pararnn --lengths 512,2048 --batch 8 --width 128 --threads 2

Inputs as the mixer sees them at init: gate inputs p ~ N(0, 0.5^2) (bias included), recurrent weights u uniform
in [-0.5, 0.5]; fp32. Each time is the median of --repeats runs. The backward of the solver is the implicit one
(one reverse scan); the loop's is autograd through every step. Also reported: the Newton scans the forward took
and the largest difference of the two solutions. Writes bench/results/pararnn_cpu_<date>.json and prints a table.
"""
import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import print_table, write_results
from model.pararnn import CELLS, RECURRENT_WEIGHT_BOUND, NewtonSolver, sequential_states

GATE_INPUT_STD = 0.5


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(cell, batch: int, length: int, heads: int, head_dim: int, tol: float, max_iters: int,
            repeats: int) -> dict:
    torch.manual_seed(0)
    p = (GATE_INPUT_STD * torch.randn(batch, length, cell.num_gates, heads, head_dim)).requires_grad_()
    u = torch.empty(cell.num_gates, heads, head_dim).uniform_(-RECURRENT_WEIGHT_BOUND, RECURRENT_WEIGHT_BOUND)
    u.requires_grad_()
    solver = NewtonSolver(cell, tol, max_iters)
    newton = lambda: solver.solve(p, u)[0]
    loop = lambda: sequential_states(cell, p, u)
    backward = lambda states: torch.autograd.grad(states.sum(), (p, u))

    with torch.no_grad():
        solved, iterations = solver.solve(p, u)
        difference = (solved - loop()).abs().max().item()
        newton_forward, loop_forward = median_seconds(newton, repeats), median_seconds(loop, repeats)
    newton_train = median_seconds(lambda: backward(newton()), repeats)
    loop_train = median_seconds(lambda: backward(loop()), repeats)
    return dict(cell=cell.name, T=length, newton_iters=iterations, max_abs_diff=difference,
                loop_fwd_ms=1e3 * loop_forward, newton_fwd_ms=1e3 * newton_forward,
                fwd_speedup=loop_forward / newton_forward, loop_fwd_bwd_ms=1e3 * loop_train,
                newton_fwd_bwd_ms=1e3 * newton_train, fwd_bwd_speedup=loop_train / newton_train)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--cells", default="gru,lstm")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64, help="channels of the recurrence (heads x head_dim)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-5, help="model.pararnn.newton_tol")
    parser.add_argument("--max-iters", type=int, default=16, help="model.pararnn.newton_max_iters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the test machine shares 2 cores)")
    parser.add_argument("--out", default=None, help="the JSON's path (default bench/results/pararnn_cpu_<date>.json)")
    args = parser.parse_args()
    if args.width % args.heads:
        parser.error(f"--heads {args.heads} must divide --width {args.width}")
    torch.set_num_threads(args.threads)

    cases = [(CELLS[name], int(length)) for name in args.cells.split(",") for length in args.lengths.split(",")]
    rows = [measure(cell, args.batch, length, args.heads, args.width // args.heads, args.tol, args.max_iters,
                    args.repeats) for cell, length in tqdm(cases, desc="cases")]
    settings = dict(batch=args.batch, width=args.width, heads=args.heads, tol=args.tol, max_iters=args.max_iters,
                    repeats=args.repeats, threads=args.threads, dtype="float32")
    print_table(f"ParaRNN Newton solver vs the sequential loop, CPU, fp32, {settings}", rows)
    write_results("pararnn_cpu", dict(device="cpu", settings=settings, rows=rows),
                  path=None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
