"""lm-evaluation-harness adapter: importing this module registers the model `baton`.

    python -m eval.lm_harness --model_args checkpoint=runs/x/checkpoints/step_000560 --tasks hellaswag ...
    lm_eval.simple_evaluate(model="baton", model_args={"checkpoint": ...}, tasks=[...])   # after import

Every lm-eval option passes through (`--model baton` is added). model_args: checkpoint (any checkpoint
python -m eval loads), and optionally chunk_len (tokens per forward, default the run's train.seq_len).
All three request types are batched and score the whole text: nothing is truncated to the training
length; the recurrent state and the KV cache are carried through it (eval.perplexity.score_tokens).
Documents start with EOS, as training packs them.
"""
import sys
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from configs.errors import ConfigError
from eval.checkpoint import load_checkpoint
from eval.perplexity import score_tokens


@register_model("baton")
class BatonLM(TemplateLM):
    def __init__(self, checkpoint: str, batch_size=8, max_batch_size: Optional[int] = None,
                 device: Optional[str] = None, chunk_len: Optional[int] = None, **_ignored):
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's CLI asks for cuda by default; take what this machine has
        loaded = load_checkpoint(checkpoint, device=torch.device(device) if device else None)
        if loaded.dataset.tokenizer is None:
            raise ConfigError(f"{checkpoint}: trained on data.source={loaded.cfg.data.source}, which has no tokenizer")
        if loaded.cfg.model.is_encoder:
            raise ConfigError(f"{checkpoint}: an encoder (bidirectional) has no causal scores or generation for "
                              "lm-eval; evaluate it with python -m eval tasks=[mlm]")
        self.model, self.tokenizer, self._device = loaded.model, loaded.dataset.tokenizer, loaded.device
        self.autocast_dtype = loaded.autocast_dtype
        self.chunk_len = int(chunk_len or loaded.cfg.train.seq_len)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": a fixed size here

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def with_eos(self, tokens: list[int]) -> list[int]:
        return tokens if tokens[:1] == [self.eot_token_id] else [self.eot_token_id] + tokens

    def score(self, sequences: list[list[int]], desc: str,
              disable_tqdm: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token (log-probability, is argmax) of tokens 1.. of each sequence, batched longest first."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out = [None] * len(sequences)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable_tqdm):
            batch = order[start:start + self.batch_size]
            width = len(sequences[batch[0]])
            rows = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for r, i in enumerate(batch):  # right padding: it never affects the positions before it
                rows[r, :len(sequences[i])] = torch.tensor(sequences[i])
            rows = rows.to(self._device)
            logprobs, greedy = score_tokens(self.model, rows[:, :-1], rows[:, 1:], self.chunk_len, self.autocast_dtype)
            for r, i in enumerate(batch):
                n = len(sequences[i]) - 1
                out[i] = logprobs[r, :n].cpu(), greedy[r, :n].cpu()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        sequences = [self.with_eos(context + continuation) for _, context, continuation in requests]
        scored = self.score(sequences, "loglikelihood", disable_tqdm)
        results = []
        for (_, _, continuation), (logprobs, greedy) in zip(requests, scored):
            n = len(continuation)
            results.append((float(logprobs[-n:].sum()), bool(greedy[-n:].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        sequences = [self.with_eos(self.tok_encode(request.args[0])) for request in requests]
        return [float(logprobs.sum()) for logprobs, _ in self.score(sequences, "loglikelihood_rolling", disable_tqdm)]

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample / temperature > 0) continuations cut at the first stop string
        or EOS; prompts of one token length decode as one batch."""
        prompts = [self.with_eos(self.tok_encode(request.args[0])) for request in requests]
        settings = [dict(request.args[1]) for request in requests]
        keys = [(len(p), repr(sorted(s.items()))) for p, s in zip(prompts, settings)]
        out = [None] * len(requests)
        groups = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        batches = [g[k:k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)]
        for batch in tqdm(batches, desc="generate_until", disable=disable_tqdm):
            s = settings[batch[0]]
            until = s.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(s.get("temperature", 0.0)) if s.get("do_sample", False) else 0.0
            with torch.autocast(self._device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                tokens = self.model.generate(torch.tensor([prompts[i] for i in batch], device=self._device),
                                             int(s.get("max_gen_toks", 256)), temperature=temperature)
            for i, row in zip(batch, tokens[:, len(prompts[batch[0]]):].tolist()):
                if self.eot_token_id in row:
                    row = row[:row.index(self.eot_token_id)]
                text = self.tok_decode(row)
                for stop in until:
                    text = text.split(stop)[0]
                out[i] = text
        return out


def main(argv: list[str]) -> None:
    """lm-eval's own command line with --model baton."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", "--model", "baton", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main(sys.argv[1:])
