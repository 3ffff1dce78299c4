"""Benchmark sequence parallelism: the compute it adds, and (with more processes) compute vs communication.

One process (plain `python`): per mixer, the whole LM (n_layers of that mixer, forward + backward) on the
same rows with the sp context of a 1-process gloo group (the summary pass, the prefix combine, the scan from
the incoming state; the collectives move nothing) against without it. The ratio is the compute overhead of
sequence parallelism (goal: at most 1.10). CPU figures are process CPU seconds (robust to a loaded machine).

Several processes (torchrun): every rank holds its slice of the rows, T = R * seq_len; per mixer the step
time, and its split into compute and communication (wall-clock time inside the sp collectives, waiting for
slower ranks included; all ranks' mean, per layer).

    python -m bench.sequence_parallel --threads 1              # overhead per recurrent mixer, CPU fp32
    python -m bench.sequence_parallel --mixers G --seq-len 4096 --repeats 9 --threads 1
    torchrun --nproc_per_node=4 -m bench.sequence_parallel     # compute / communication split per layer
Prints a table and writes JSON (device, versions, date, settings, results) to bench/results/.
"""
import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from bench.common import print_table, write_results
from model import LM
from model.registry import MIXERS
from parallel.sequence import SequenceParallel, timing_collectives

# The recurrent mixers, by pattern letter: sp's summary pass is theirs (attention only gathers keys).
RECURRENT = {mixer.letter: mixer.name for mixer in MIXERS.values() if mixer.recurrent}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(mixer: str, args, device: torch.device) -> LM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=args.vocab, d_model=args.d_model, pattern=mixer, n_layers=args.n_layers)
    return LM.from_config(cfg).to(device)


def step_seconds(lm: LM, tokens: torch.Tensor, cu_seqlens: torch.Tensor, sp_of, clock=time.perf_counter) -> float:
    """One forward + backward of the mean logit (the sp context is built inside, as train.py does per batch)."""
    lm.zero_grad(set_to_none=True)
    sync()
    start = clock()
    sp = sp_of()
    lm(tokens, cu_seqlens=cu_seqlens, sp=sp).float().mean().backward()
    sync()
    return clock() - start


def overhead(args, device: torch.device) -> list[dict]:
    """One process: the LM with the sp context of a 1-process group vs without it. On the CPU the clock is the
    process's CPU time, which other processes' load on a shared machine does not inflate (use --threads 1)."""
    group = dist.group.WORLD
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    rows = []
    for mixer in args.mixers:
        lm = build(mixer, args, device)
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
        cu = torch.arange(args.batch + 1, device=device, dtype=torch.int32) * args.seq_len
        starts = torch.ones(args.batch, dtype=torch.bool, device=device)
        plain_of = lambda: None
        sp_of = lambda: SequenceParallel(group, cu, starts)
        for _ in range(args.warmup):
            step_seconds(lm, tokens, cu, plain_of), step_seconds(lm, tokens, cu, sp_of)
        plain, with_sp = [], []
        for _ in range(args.repeats):  # interleaved, so a change of load hits both alike
            plain.append(step_seconds(lm, tokens, cu, plain_of, clock))
            with_sp.append(step_seconds(lm, tokens, cu, sp_of, clock))
        rows.append(dict(mixer=RECURRENT[mixer], plain_s=statistics.median(plain), sp_s=statistics.median(with_sp),
                         overhead=statistics.median(with_sp) / statistics.median(plain)))
    return rows


def split(args, device: torch.device) -> list[dict]:
    """torchrun: every rank its slice of one document per row; step time split into compute and communication."""
    group, rank, size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    rows = []
    for mixer in args.mixers:
        lm = build(mixer, args, device)
        torch.manual_seed(1)
        tokens = torch.randint(0, args.vocab, (args.batch, size * args.seq_len), device=device)
        local = tokens[:, rank * args.seq_len:(rank + 1) * args.seq_len]
        cu = torch.arange(args.batch + 1, device=device, dtype=torch.int32) * args.seq_len
        starts = torch.full((args.batch,), rank == 0, dtype=torch.bool, device=device)
        sp_of = lambda: SequenceParallel(group, cu, starts)
        for _ in range(args.warmup):
            step_seconds(lm, local, cu, sp_of)
        totals, comms = [], []
        for _ in range(args.repeats):
            with timing_collectives() as timer:
                totals.append(step_seconds(lm, local, cu, sp_of))
            comms.append(timer.seconds)
        measured = torch.tensor([statistics.median(totals), statistics.median(comms)], dtype=torch.float64)
        dist.all_reduce(measured)
        step, comm = (measured / size).tolist()
        rows.append(dict(mixer=RECURRENT[mixer], ranks=size, step_s=step,
                         compute_per_layer_s=(step - comm) / args.n_layers,
                         communication_per_layer_s=comm / args.n_layers, communication_share=comm / step))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="+", default=list(RECURRENT), choices=list(RECURRENT))
    parser.add_argument("--d-model", type=int, default=768, help="the 125M presets' width")
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row per rank")
    parser.add_argument("--repeats", type=int, default=5, help="median of this many steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tag", default="", help="added to the JSON file's name (e.g. before)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    launched = "RANK" in os.environ  # torchrun
    with tempfile.TemporaryDirectory() as tmp:
        if launched:
            if cuda:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl" if cuda else "gloo")
        else:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        device = torch.device("cuda" if cuda else "cpu")
        try:
            rows = split(args, device) if launched else overhead(args, device)
        finally:
            dist.destroy_process_group()
    if launched and int(os.environ["RANK"]) != 0:
        return
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {threads} threads)"
    title = ("compute / communication per layer under sp (seconds, mean over ranks)" if launched else
             "whole LM forward + backward with the sp context of a 1-process group vs without (median seconds)")
    print_table(f"{title}; {args.n_layers} layers, d_model {args.d_model}, B {args.batch}, T {args.seq_len}", rows)
    kind = "_".join(filter(None, ["split" if launched else "overhead", "cuda" if cuda else "cpu", args.tag]))
    write_results(f"sequence_parallel_{kind}", dict(device=device_name, settings=vars(args), results=rows))


if __name__ == "__main__":
    main()
