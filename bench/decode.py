"""Generation speed and memory of each 370M preset (random weights): per-step time, decode and prefill tokens/s,
peak memory and the decode state's size, at context 2K, 8K and 32K, batch 1 and 8; and the aten operations of
one decode step per block (the constant-work property: the same count at every context).

    python -m bench.decode                          # CUDA: everything; CPU: the reduced measurement below
    python -m bench.decode --presets gated_deltanet_hybrid_370m,transformer_370m --contexts 2048,8192 --batches 1
    python -m bench.decode --mode eager             # CUDA without the captured graph (or --mode compile)

CUDA: each full preset in bf16; per (batch, context) a prefill of `context` random tokens, then --steps decode
steps through LM.generate (one step captured as a CUDA graph by default).
CPU (two shared cores cannot prefill 32K tokens through 24 layers): one period of each preset's pattern at full
width (1 layer; 4 for the 3:1 hybrids) in fp32, the state set to the context length without a prefill (a decode
step reads the whole preallocated cache whatever it holds, so its work is the same), per-step time at the
--cpu-contexts (2K and 8K), and prefill tokens/s of a --cpu-prompt-token prompt.
Writes bench/results/decode_<cpu|cuda>_<date>.json (device, versions, date, settings, rows) and prints a table.
"""
import argparse
import platform
import time

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from bench.common import REPO, write_results
from model import LM
from model.config import _pattern_letters
from model.decode_ops import count_decode_ops

PRESETS = ["transformer_370m", "gla_370m", "gla_hybrid_370m", "mamba2_370m", "mamba2_hybrid_370m",
           "gated_deltanet_370m", "gated_deltanet_hybrid_370m", "mlstm_370m"]
VOCAB = 32000  # what the presets' parameter counts assume


def build(preset: str, device: torch.device, dtype: torch.dtype, one_period: bool) -> LM:
    cfg = OmegaConf.load(REPO / "configs" / "model" / f"{preset}.yaml")
    cfg.vocab_size = VOCAB
    if one_period:
        cfg.n_layers = len(_pattern_letters(cfg.pattern))
    torch.manual_seed(0)
    with torch.device(device):
        return LM.from_config(cfg).to(dtype).eval()


def warm_up(lm: LM):
    """One short generation: kernel compilation, autotuning and lazy imports out of the measured times."""
    lm.generate(torch.zeros(1, 80, dtype=torch.long, device=lm.embed.weight.device), 3, cuda_graph=False)


def step_seconds(lm: LM, state, batch: int, steps: int) -> float:
    """Median seconds of one decode step (two warm-up steps first)."""
    token_ids = torch.zeros(batch, dtype=torch.long, device=state.lengths.device)
    times = []
    with torch.no_grad():
        for i in range(steps + 2):
            start = time.perf_counter()
            lm.decode_step(token_ids, state)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_cpu(preset: str, args) -> list[dict]:
    lm = build(preset, torch.device("cpu"), torch.float32, one_period=True)
    warm_up(lm)
    rows = []
    prompt = torch.randint(0, VOCAB, (1, args.cpu_prompt_tokens))
    state = lm.init_state(1, args.cpu_prompt_tokens)
    start = time.perf_counter()
    with torch.no_grad():
        lm.prefill(prompt, state, last_only=True)
    prefill_tokens_per_s = args.cpu_prompt_tokens / (time.perf_counter() - start)
    for batch in args.batches:
        for context in args.cpu_contexts:
            state = lm.init_state(batch, context + args.steps + 3)
            state.lengths.fill_(context)
            ops = count_decode_ops(lm, torch.zeros(batch, dtype=torch.long), state)
            seconds = step_seconds(lm, state, batch, args.steps)
            rows.append({"preset": preset, "layers": len(lm.blocks), "batch": batch, "context": context,
                         "step_ms": seconds * 1e3, "decode_tokens_per_s": batch / seconds,
                         "prefill_tokens_per_s": prefill_tokens_per_s, "state_mb": state.nbytes() / 1e6,
                         "ops_per_step": ops["total"], "ops_per_block": {b["mixer"]: b for b in ops["blocks"]}})
    return rows


def measure_cuda(preset: str, args) -> list[dict]:
    device = torch.device("cuda")
    lm = build(preset, device, torch.bfloat16, one_period=False)
    warm_up(lm)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            lm.__dict__.pop("_decode_step", None)  # free the previous configuration's graph and state
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            prompt = torch.randint(0, VOCAB, (batch, context), device=device)
            timings = {}
            try:
                lm.generate(prompt, args.steps + 1, timings=timings, cuda_graph=args.mode)
            except torch.OutOfMemoryError:
                rows.append({"preset": preset, "batch": batch, "context": context, "error": "out of memory"})
                continue
            lm.__dict__.pop("_decode_step", None)  # one state alive at a time: the next line sizes one
            state = lm.init_state(batch, context + args.steps + 1)
            rows.append({"preset": preset, "layers": len(lm.blocks), "batch": batch, "context": context,
                         "mode": str(args.mode), "step_ms": timings["decode_s"] / timings["decode_steps"] * 1e3,
                         "decode_tokens_per_s": batch * timings["decode_steps"] / timings["decode_s"],
                         "prefill_tokens_per_s": batch * context / timings["prefill_s"],
                         "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                         "state_mb": state.nbytes() / 1e6})
            del state
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--mode", default="graph", choices=["graph", "compile", "eager"])
    parser.add_argument("--cpu-contexts", default="2048,8192")
    parser.add_argument("--cpu-prompt-tokens", type=int, default=256)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on CPU (the default one: shared cores make more threads slower)")
    parser.add_argument("--tag", default="", help="appended to the result file's name")
    args = parser.parse_args()
    args.contexts, args.cpu_contexts, args.batches = ([int(x) for x in value.split(",")] for value in (
        args.contexts, args.cpu_contexts, args.batches))
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        args.steps = min(args.steps, 16)
        torch.set_num_threads(args.cpu_threads)
    rows = []
    for preset in tqdm(args.presets.split(","), desc="presets"):
        rows += measure_cuda(preset, args) if on_cuda else measure_cpu(preset, args)
    print(f"{'preset':<28} {'B':>2} {'context':>7} {'ms/step':>8} {'tok/s':>8} {'prefill tok/s':>13} {'state MB':>9}"
          f" {'ops/step':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<28} {r['batch']:>2} {r['context']:>7} {r['error']}")
            continue
        print(f"{r['preset']:<28} {r['batch']:>2} {r['context']:>7} {r['step_ms']:>8.2f} "
              f"{r['decode_tokens_per_s']:>8.1f} {r['prefill_tokens_per_s']:>13,.0f} {r['state_mb']:>9.1f} "
              f"{r.get('ops_per_step', ''):>8}")
    write_results(f"decode_{'cuda' if on_cuda else 'cpu'}{args.tag}",
                  dict(device=torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
                       settings=vars(args), rows=rows))


if __name__ == "__main__":
    main()
