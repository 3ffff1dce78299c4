"""Generate continuations of prompts with any checkpoint or export, and report the generation speed.

    python -m eval.generate checkpoint=runs/default/checkpoints/step_000560 prompt="Once upon a time" \
        [prompts_file=FILE] [max_new_tokens=128] [temperature=0] [top_p=1] [top_k=0] [seed=0] [batch_size=8] \
        [cuda_graph=true|false|compile] [out=FILE.jsonl] [any config override]

The checkpoint loads as `python -m eval` loads it (eval/checkpoint.py) and its data's sentencepiece tokenizer
encodes the prompts (each after EOS, the documents' separator in training). prompts_file holds one prompt a
line. Prompts are decoded batch_size at a time, rows of different lengths side by side (per-row positions);
a continuation ends at EOS or after max_new_tokens. Prints each continuation (or writes them as JSON lines to
out=) and, on stderr, prefill and decode tokens/s and the peak memory. Bad input: one line and exit 2.
"""
import json
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from configs.errors import ConfigError, run_cli
from eval.checkpoint import load_checkpoint

USAGE = ('usage: python -m eval.generate checkpoint=<dir> prompt="..." | prompts_file=<file> [max_new_tokens=128] '
         '[temperature=0] [top_p=1] [top_k=0] [seed=0] [batch_size=8] [cuda_graph=true|false|compile] [out=<file>] '
         '[overrides]')
SETTINGS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
            "batch_size": int}
DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0, "batch_size": 8}
CUDA_GRAPH = {"true": True, "false": False, "compile": "compile"}


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(named arguments, typed, and config overrides) from `key=value` arguments."""
    named, overrides = dict(DEFAULTS, cuda_graph=True), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg}: expected key=value ({USAGE})")
        if key in SETTINGS:
            try:
                named[key] = SETTINGS[key](value)
            except ValueError:
                raise ConfigError(f"{key}={value}: expected a {SETTINGS[key].__name__}") from None
        elif key == "cuda_graph":
            if value.lower() not in CUDA_GRAPH:
                raise ConfigError(f"cuda_graph={value}: expected one of {', '.join(CUDA_GRAPH)}")
            named[key] = CUDA_GRAPH[value.lower()]
        elif key in ("checkpoint", "prompt", "prompts_file", "out"):
            named[key] = value
        else:
            overrides.append(arg)
    if "checkpoint" not in named:
        raise ConfigError(f"no checkpoint given ({USAGE})")
    if ("prompt" in named) == ("prompts_file" in named):
        raise ConfigError(f"give exactly one of prompt= and prompts_file= ({USAGE})")
    if named["max_new_tokens"] < 1 or named["batch_size"] < 1:
        raise ConfigError("max_new_tokens and batch_size must be at least 1")
    return named, overrides


def read_prompts(named: dict) -> list[str]:
    if "prompt" in named:
        return [named["prompt"]]
    path = Path(named["prompts_file"])
    if not path.is_file():
        raise ConfigError(f"prompts_file={path}: no such file")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts_file={path}: no prompt in it")
    return prompts


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak resident set (Linux: KiB)


def generate_continuations(named: dict, overrides: list[str], progress: bool = True) -> dict:
    loaded = load_checkpoint(named["checkpoint"], overrides)
    tokenizer = loaded.dataset.tokenizer
    if tokenizer is None:
        raise ConfigError(f"{named['checkpoint']}: trained on data.source={loaded.cfg.data.source}, which has no "
                          "tokenizer to encode prompts with")
    model, device = loaded.model, loaded.device
    if device.type == "cuda":
        model.to(torch.bfloat16)  # generation reads every weight per token: half the bytes
        torch.cuda.reset_peak_memory_stats(device)
    prompts = read_prompts(named)
    encoded = [[tokenizer.eos_id] + tokenizer.encode(text) for text in prompts]
    # One-time costs (kernel compilation and autotuning, lazy imports) out of the measured speed.
    model.generate(torch.full((1, 2), tokenizer.eos_id, device=device), 2, cuda_graph=False)
    generator = torch.Generator(device).manual_seed(named["seed"])
    results, timing = [], {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
    batches = range(0, len(encoded), named["batch_size"])
    for first in tqdm(batches, desc="generate", disable=not progress or len(batches) == 1):
        rows = encoded[first:first + named["batch_size"]]
        lengths = torch.tensor([len(r) for r in rows], device=device)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        sample = dict(temperature=named["temperature"], top_p=named["top_p"], top_k=named["top_k"],
                      generator=generator, prompt_lengths=lengths, stop_tokens=(tokenizer.eos_id,),
                      cuda_graph=named["cuda_graph"])
        timings = {}
        out = model.generate(ids, named["max_new_tokens"], timings=timings, **sample)
        timing["prefill_tokens"] += int(lengths.sum())
        timing["prefill_s"] += timings["prefill_s"]
        timing["decode_tokens"] += timings["decode_steps"] * len(rows)  # every row steps, ended ones on padding
        timing["decode_s"] += timings["decode_s"]
        for i, n in enumerate(lengths.tolist()):
            continuation = out[i, n:n + named["max_new_tokens"]].tolist()
            if tokenizer.eos_id in continuation:
                continuation = continuation[:continuation.index(tokenizer.eos_id)]
            results.append({"prompt": prompts[first + i], "continuation": tokenizer.decode(continuation),
                            "tokens": len(continuation)})
    report = {"prefill_tokens_per_s": timing["prefill_tokens"] / timing["prefill_s"],
              "decode_tokens_per_s": timing["decode_tokens"] / max(timing["decode_s"], 1e-9),
              "peak_memory_gb": peak_memory_bytes(device) / 1e9, "device": str(device), **timing}
    if "out" in named:
        Path(named["out"]).write_text("".join(json.dumps(r) + "\n" for r in results))
        print(f"wrote {len(results)} continuations to {named['out']}")
    else:
        for r in results:
            print(r["prompt"] + r["continuation"])
    print(f"prefill {report['prefill_tokens_per_s']:,.0f} tokens/s, decode {report['decode_tokens_per_s']:,.1f} "
          f"tokens/s, peak memory {report['peak_memory_gb']:.2f} GB ({device})", file=sys.stderr)
    return {"results": results, "speed": report}


def main(argv: list[str]) -> int:
    return run_cli(lambda: generate_continuations(*parse_args(argv)) and 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
