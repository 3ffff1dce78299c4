"""ParaRNN: the Newton solver (model/pararnn.py, one diagonal or block-diagonal scan per iteration) against the cell
stepped token by token, forward and forward + backward, for the GRU, the peephole LSTM and the paper's LSTM through
(h, c) (and its CIFG variant with --cells ...,lstm_cifg) at T = 2K to 32K.

    OMP_NUM_THREADS=1 python -m bench.pararnn                       # the README's table (CPU, one thread)
    python -m bench.pararnn --lengths 2048,8192 --cells gru,lstm_hc --batch 8 --width 128 --threads 2
    python -m bench.pararnn --device cuda                            # on a GPU (the Triton scans)

Inputs as the mixer sees them at init: gate inputs p ~ N(0, 0.5^2) (bias included), recurrent weights u uniform
in [-0.5, 0.5]; fp32. The solver runs as a layer does once the training metrics have planned its iterations
(model/pararnn.py): a first solve up to newton_max_iters measures the iterations convergence needs (`newton_iters`,
the differentiable one included), the timed solves run that many plus PLAN_MARGIN (`scans`), convergence tested on
the device with no host read, damped by --damping (0: plain Newton). Each time is the median of --repeats runs.
The backward of the solver is the implicit one (one reverse scan); the loop's is autograd through every step. Also
reported: the largest difference of the two solutions (`max_abs_diff`, and relative to the largest state). Writes
bench/results/pararnn_<device>_<date>.json and prints a table.
"""
import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import print_table, write_results
from model.pararnn import CELLS, PLAN_MARGIN, RECURRENT_WEIGHT_BOUND, NewtonSolver, sequential_states

GATE_INPUT_STD = 0.5


def median_seconds(run, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(cell, batch: int, length: int, heads: int, head_dim: int, tol: float, max_iters: int, damping,
            repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    p = (GATE_INPUT_STD * torch.randn(batch, length, cell.num_gates, heads, head_dim, device=device)).requires_grad_()
    u = torch.empty(cell.num_gates, heads, head_dim, device=device).uniform_(-RECURRENT_WEIGHT_BOUND,
                                                                              RECURRENT_WEIGHT_BOUND)
    u.requires_grad_()
    loop = lambda: sequential_states(cell, p, u)  # noqa: E731
    backward = lambda states: torch.autograd.grad(states.sum(), (p, u))  # noqa: E731

    with torch.no_grad():
        first = NewtonSolver(cell, tol, max_iters, damping=damping)
        solved, needed = first.solve(p, u)
        needed, converged = int(needed), bool(first.converged)
        expected = loop()
        difference = (solved - expected).abs().max().item()
        relative = difference / expected.abs().max().item()
    solver = NewtonSolver(cell, tol, max_iters, damping=damping, iterations=needed - 1 + PLAN_MARGIN)
    newton = lambda: solver.solve(p, u)[0]  # noqa: E731
    with torch.no_grad():
        newton_forward = median_seconds(newton, repeats, device)
        loop_forward = median_seconds(loop, repeats, device)
    newton_train = median_seconds(lambda: backward(newton()), repeats, device)
    loop_train = median_seconds(lambda: backward(loop()), repeats, device)
    return dict(cell=cell.name, T=length, newton_iters=needed, scans=solver.iterations + 1, converged=converged,
                max_abs_diff=difference, rel_diff=relative, loop_fwd_ms=1e3 * loop_forward,
                newton_fwd_ms=1e3 * newton_forward, fwd_speedup=loop_forward / newton_forward,
                loop_fwd_bwd_ms=1e3 * loop_train, newton_fwd_bwd_ms=1e3 * newton_train,
                fwd_bwd_speedup=loop_train / newton_train)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--cells", default="gru,lstm,lstm_hc", help=f"of {', '.join(CELLS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64, help="channels of the recurrence (heads x head_dim)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-5, help="model.pararnn.newton_tol")
    parser.add_argument("--max-iters", type=int, default=16, help="model.pararnn.newton_max_iters")
    parser.add_argument("--damping", type=float, default=1.0, help="model.pararnn.newton_damping (0: plain Newton)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the test machine shares 2 cores)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton scans)")
    parser.add_argument("--out", default=None,
                        help="the JSON's path (default bench/results/pararnn_<device>_<date>.json)")
    args = parser.parse_args()
    if args.width % args.heads:
        parser.error(f"--heads {args.heads} must divide --width {args.width}")
    unknown = set(args.cells.split(",")) - set(CELLS)
    if unknown:
        parser.error(f"--cells: unknown {sorted(unknown)}, expected some of {', '.join(CELLS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    damping = args.damping or None

    cases = [(CELLS[name], int(length)) for name in args.cells.split(",") for length in args.lengths.split(",")]
    rows = [measure(cell, args.batch, length, args.heads, args.width // args.heads, args.tol, args.max_iters, damping,
                    args.repeats, device) for cell, length in tqdm(cases, desc="cases")]
    settings = dict(batch=args.batch, width=args.width, heads=args.heads, tol=args.tol, max_iters=args.max_iters,
                    damping=damping, repeats=args.repeats, threads=args.threads, dtype="float32",
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    print_table(f"ParaRNN Newton solver vs the sequential loop, fp32, {settings}", rows)
    write_results(f"pararnn_{device.type}", dict(device=settings["device"], settings=settings, rows=rows),
                  path=None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
