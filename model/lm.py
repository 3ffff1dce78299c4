"""The language model: embed -> [pre-norm block: mixer, SwiGLU MLP] x L -> norm -> head.

Each block's mixer is chosen by the config's layer pattern. The same forward serves training
(`lm(input_ids, cu_seqlens, sp)`) and generation (`lm.step(token_ids, state)`): a per-layer cache dict
turns every mixer stateful (recurrent state and conv state, or a KV cache), so prefill and decode are
the training code with an initial state. Checkpoints (saving, exports, loading any engine's) are
checkpoints/'s: `checkpoints.load_model(dir)`.
"""
import math
from typing import Optional, Union

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from configs.errors import ConfigError
# The mixers register themselves (model/registry.py) when imported; the model builds them from the registry.
from model import gla, mamba2, gated_deltanet, attention  # noqa: F401  (this order: the pattern letters' listing)
from model.config import ModelConfig
from model.flops import forward_flops_per_token
from model.layers import RMSNorm, SwiGLU
from model.registry import MIXERS

State = list[dict]  # one cache dict per layer (see each mixer's init_cache)
RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")  # write into the residual stream: init scaled by depth


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: str):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[mixer].build(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cu_seqlens=cu_seqlens, sp=sp, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is null (follow the data): train.py sets it from the data's "
                              "tokenizer (model.config.vocab_for_data); set it to build a model without data")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, name) for name in cfg.layer_mixers())
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @classmethod
    def from_config(cls, cfg: Union[ModelConfig, DictConfig, dict]) -> "LM":
        """Build from a ModelConfig, or a DictConfig / dict of its fields (validated by the schema)."""
        if not isinstance(cfg, ModelConfig):
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg))
        return cls(cfg)

    @torch.no_grad()
    def init_weights(self):
        """GPT-2 / GLA-paper init: N(0, init_std) for matmuls and embeddings, residual projections
        shrunk by sqrt(2 * n_layers) so the residual stream's variance does not grow with depth; each
        mixer's own parameters (gates, convs) by its reset_parameters. In place only: rerun it after
        building on the meta device and materialising (e.g. FSDP2's to_empty)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for name, param in self.named_parameters():
            if name.rsplit(".", 2)[-2] in RESIDUAL_PROJECTIONS:
                param.div_(math.sqrt(2 * len(self.blocks)))

    def forward(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None) -> torch.Tensor:
        """Logits [B, T, vocab], padding ids (valid_vocab_size and up) at -inf. cu_seqlens (int32 [N+1] over
        the flattened B*T tokens, every row start included) isolates packed documents; sp is the
        sequence-parallel context of this batch."""
        if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32):
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        return self._run(input_ids, cu_seqlens, sp, None)

    def _run(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor], sp,
             state: Optional[State]) -> torch.Tensor:
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens=cu_seqlens, sp=sp, cache=None if state is None else state[i])
        logits = self.lm_head(self.norm(x))
        if self.config.valid_vocab_size is not None:
            # Padding ids (the vocabulary rounded up past the tokenizer's): never sampled, scored or learnt.
            # In place: the head's matmul keeps nothing of its output for backward, so no second logits copy.
            logits[..., self.config.valid_vocab_size:] = float("-inf")
        return logits

    # --- generation -------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> State:
        """Empty per-layer states: zero recurrent and conv states, empty KV caches."""
        return [block.mixer.init_cache(batch_size) for block in self.blocks]

    def step(self, token_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Advance every row by token_ids: [B] (one decode step, logits [B, vocab]) or [B, T] (a prefill,
        logits [B, T, vocab]). Returns the new state; the given one is left untouched."""
        state = [dict(layer) for layer in state]
        logits = self._run(token_ids[:, None] if token_ids.dim() == 1 else token_ids, None, None, state)
        return (logits[:, 0] if token_ids.dim() == 1 else logits), state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prompt [B, T] -> prompt plus max_new_tokens sampled tokens [B, T + max_new_tokens].
        temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens with that much mass."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        logits, state = self.step(input_ids, self.init_state(input_ids.shape[0]))
        logits, tokens = logits[:, -1], [input_ids]
        for i in range(max_new_tokens):
            next_token = sample(logits, temperature, top_p, generator)
            tokens.append(next_token[:, None])
            if i + 1 < max_new_tokens:
                logits, state = self.step(next_token, state)
        return torch.cat(tokens, dim=1)

    # --- accounting -------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied head counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token at this sequence length; see model/flops.py."""
        return 3 * forward_flops_per_token(self, seq_len)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (so the top token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
