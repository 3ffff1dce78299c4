"""Generation: the preallocated decode state, sampling, and the decode loop.

A DecodeState is allocated once per (batch, max_len): every attention layer's KV cache at its full size,
every recurrent layer's state and conv window, and each row's length (a tensor, so rows of different
prompt lengths decode side by side at their own positions). A prefill writes it through the chunked
kernels; a decode step writes one token per row in place, with a fixed set of operations and no host sync,
which is what lets the loop capture one step as a CUDA graph and replay it (mamba_ssm's cg=True), or hand it
to torch.compile(mode="reduce-overhead").
"""
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch

WARMUP_STEPS = 2  # eager decode steps before a capture: Triton autotuning and the allocator settle first
STOP_CHECK_EVERY = 32  # decode steps between checks that every row has stopped (the loop's only host sync)


@dataclass
class DecodeState:
    caches: list[dict]     # per layer: tensors with the rows first, and a "constants" dict (not per row)
    lengths: torch.Tensor  # [B] long: tokens each row holds, i.e. the position of its next token
    max_len: int

    def view_rows(self, rows: slice, start: int) -> list[dict]:
        """The layers' caches of a run of rows, as views (writes land in this state), for a prefill from
        position `start` (every row of the run holds `start` tokens)."""
        return [{key: value if key == "constants" else value[rows] for key, value in cache.items()} | {"start": start}
                for cache in self.caches]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every per-row tensor of the state once (views of another, like a fused conv window's parts, skipped)."""
        for cache in self.caches:
            for key, value in cache.items():
                if key != "constants" and value._base is None:
                    yield value

    def numel(self) -> int:
        """Floats the state holds (KV caches, recurrent states, conv windows)."""
        return sum(t.numel() for t in self.tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self):
        """Back to empty rows, in place (a captured graph keeps the addresses)."""
        self.lengths.zero_()
        for tensor in self.tensors():
            tensor.zero_()


def prefill_groups(state: DecodeState, seq_len: int,
                   lengths: Optional[torch.Tensor]) -> Iterator[tuple[slice, int, int]]:
    """(rows, start, prompt length) for each run of consecutive rows sharing their current length and prompt
    length: one batched prefill each (one in all for equal prompts)."""
    batch = state.lengths.shape[0]
    prompt = [seq_len] * batch if lengths is None else lengths.tolist()
    if len(prompt) != batch or not all(1 <= n <= seq_len for n in prompt):
        raise ValueError(f"prefill: lengths must be {batch} values in [1, {seq_len}], got {prompt}")
    start = state.lengths.tolist()
    if max(s + n for s, n in zip(start, prompt)) > state.max_len:
        raise ValueError(f"prefill: a row would hold more than the state's max_len={state.max_len} tokens "
                         f"(held {start}, adding {prompt})")
    first = 0
    for row in range(1, batch + 1):
        if row == batch or (start[row], prompt[row]) != (start[first], prompt[first]):
            yield slice(first, row), start[first], prompt[first]
            first = row


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]: greedy at temperature 0, otherwise sampled from the top_k
    likeliest tokens (0: all), then from the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (so the top token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class EagerDecodeStep:
    def __init__(self, lm, batch_size: int, max_len: int):
        self.lm, self.state = lm, lm.init_state(batch_size, max_len)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.decode_step(token_ids, self.state)


class GraphedDecodeStep:
    """One decode step captured as a CUDA graph, with the state and token buffer it reads and writes: a call
    copies the tokens in and replays (one launch for the whole model)."""

    def __init__(self, lm, batch_size: int, max_len: int):
        self.state = lm.init_state(batch_size, max_len)
        self.token_ids = torch.zeros(batch_size, dtype=torch.long, device=self.state.lengths.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                lm.decode_step(self.token_ids, self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = lm.decode_step(self.token_ids, self.state)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.token_ids.copy_(token_ids)
        self.graph.replay()
        return self.logits


class CompiledDecodeStep(EagerDecodeStep):
    """The decode step under torch.compile(mode="reduce-overhead") (Inductor's CUDA graph trees)."""

    def __init__(self, lm, batch_size: int, max_len: int):
        super().__init__(lm, batch_size, max_len)
        # The step writes the state in place: static addresses let the CUDA graph trees keep it (inputs that
        # are mutated and not static make them skip the graph).
        for tensor in (*self.state.tensors(), self.state.lengths,
                       *(t for cache in self.state.caches for t in cache.get("constants", {}).values())):
            torch._dynamo.mark_static_address(tensor)
        self.compiled = torch.compile(lm.decode_step, mode="reduce-overhead")

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.compiled(token_ids, self.state)


DECODE_STEPS = {True: GraphedDecodeStep, "graph": GraphedDecodeStep, "compile": CompiledDecodeStep,
                False: EagerDecodeStep, "eager": EagerDecodeStep}


def decode_step_for(lm, batch_size: int, max_len: int, mode: Union[bool, str]) -> Callable:
    """The decode step of this mode with its own state. Graphed and compiled steps are built once per
    (batch, max_len) and kept on the model (a capture costs a warm-up and the graph's memory)."""
    if mode not in DECODE_STEPS:
        raise ValueError(f"cuda_graph must be one of True, False, 'graph', 'compile', 'eager'; got {mode!r}")
    step_class = DECODE_STEPS[mode] if lm.embed.weight.is_cuda else EagerDecodeStep
    if step_class is EagerDecodeStep:
        return step_class(lm, batch_size, max_len)
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    key = (step_class.__name__, batch_size, max_len, autocast)
    kept = lm.__dict__.get("_decode_step")
    if kept is None or kept[0] != key:  # only the latest is kept: its state (KV caches) can be large
        lm.__dict__["_decode_step"] = None
        try:
            kept = (key, step_class(lm, batch_size, max_len))
        except RuntimeError as err:  # e.g. an op that syncs with the host cannot be captured
            warnings.warn(f"decoding eagerly: the {step_class.__name__} could not be built: "
                          f"{str(err).splitlines()[0]}")
            return EagerDecodeStep(lm, batch_size, max_len)
        lm.__dict__["_decode_step"] = kept
    return kept[1]


def decode_loop(lm, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                generator: Optional[torch.Generator], prompt_lengths: Optional[torch.Tensor],
                stop_tokens: tuple[int, ...], max_len: Optional[int], mode: Union[bool, str],
                timings: Optional[dict] = None) -> torch.Tensor:
    """LM.generate's loop (see there): prefill, then sample and decode one token per row at a time. `timings`
    (a dict) receives the seconds of the prefill and of the decoding (synchronised), and the decode steps run."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 0:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and max_new_tokens >= 0, "
                         f"got {temperature}, {top_p}, {top_k}, {max_new_tokens}")
    B, T = input_ids.shape
    device = input_ids.device
    if prompt_lengths is None:
        prompt_lengths = torch.full((B,), T, dtype=torch.long, device=device)
    prompt_lengths = prompt_lengths.to(device=device, dtype=torch.long)
    longest = int(prompt_lengths.max())
    max_len = longest + max_new_tokens if max_len is None else max_len
    if max_len < longest:
        raise ValueError(f"generate: max_len={max_len} is shorter than the longest prompt ({longest} tokens)")
    num_steps = min(max_new_tokens, max_len - longest)

    step = decode_step_for(lm, B, max_len, mode)
    step.state.reset()
    started = _synchronized_clock(device)
    logits = lm.prefill(input_ids, step.state, prompt_lengths, last_only=True)
    rows = torch.arange(B, device=device)
    in_prompt = torch.arange(T, device=device) < prompt_lengths[:, None]
    out = torch.cat((input_ids * in_prompt, input_ids.new_zeros(B, max_new_tokens)), 1)
    stops = torch.tensor(stop_tokens, dtype=input_ids.dtype, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    prefilled = _synchronized_clock(device) if timings is not None else 0.0
    steps_run = 0
    for i in range(num_steps):
        token = sample(logits, temperature, top_p, top_k, generator)
        if stop_tokens:
            token = token.masked_fill(finished, 0)  # a stopped row pads with 0
        out[rows, prompt_lengths + i] = token
        if stop_tokens:
            finished |= torch.isin(token, stops)
            if (i + 1) % STOP_CHECK_EVERY == 0 and bool(finished.all()):
                break
        if i + 1 < num_steps:
            logits = step(token)
            steps_run += 1
    if timings is not None:
        timings.update(prefill_s=prefilled - started, decode_s=_synchronized_clock(device) - prefilled,
                       decode_steps=steps_run)
    return out


def _synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
