"""The language model: embed -> [pre-norm block: mixer, SwiGLU MLP] x L -> norm -> head.

Each block's mixer is chosen by the config's layer pattern. The same forward serves training
(`lm(input_ids, cu_seqlens, sp)`) and a prompt's prefill (`lm.step(prompt_ids, state)`): a per-layer cache
dict turns every mixer stateful (recurrent state and conv window, or a KV cache), so a prefill is the
training code with an initial state. A decode step (`lm.step(token_ids [B], state)`) runs each mixer's
`decode`: one token per row, the fused recurrent kernels, a fixed number of operations whatever the context
(model/generation.py: the preallocated state, sampling, CUDA graphs). Checkpoints (saving, exports, loading
any engine's) are checkpoints/'s: `checkpoints.load_model(dir)`.
"""
import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from configs.errors import ConfigError
# The mixers register themselves (model/registry.py) when imported; the model builds them from the registry.
# (this order: the pattern letters' listing)
from model import gla, mamba2, gated_deltanet, rglru, pararnn, mlstm, attention  # noqa: F401
from model import liger  # noqa: F401  (Z: Liger, an attention layer linearized; model/liger.py)
from model import lion  # noqa: F401  (LION's encoder mixers: F, N, S)
from model.bidirectional import encoder_only
from model.config import ModelConfig
from model.flops import forward_flops_per_token
from model.layers import RMSNorm, SwiGLU
from model.generation import DecodeState, decode_loop, prefill_groups
from model.loss import linear_cross_entropy, linear_distillation_loss
from model.lora import LoRALinear, apply_lora
from model.registry import MIXERS

RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")  # write into the residual stream: init scaled by depth


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: str):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[mixer].build(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                cache: Optional[dict] = None, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, d_model]; with positions [B], a decode step: one token per row, x [B, d_model] (2-D: each
        linear is one matmul) at the rows' positions, through the mixer's `decode` (a module call, so
        wrappers' hooks such as FSDP's still run)."""
        if positions is not None:
            x = x + self.mixer.decode(self.mixer_norm(x), cache, positions)
        else:
            x = x + self.mixer(self.mixer_norm(x), cu_seqlens=cu_seqlens, sp=sp, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Linear):
    """The output head: logits, or with targets the loss straight from the hidden states (model/loss.py).
    The loss is computed inside this module's forward so that every engine's hooks (FSDP2's unshard,
    DeepSpeed ZeRO-3's gather) hold the head's weight while it is used. Ids from valid_vocab_size on (the
    vocabulary rounded up past the tokenizer's) are -inf: never sampled, scored or learnt."""

    def __init__(self, d_model: int, vocab_size: int, valid_vocab_size: Optional[int]):
        super().__init__(d_model, vocab_size, bias=False)
        self.valid_vocab_size = valid_vocab_size

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None,
                reduction: str = "mean", teacher_hidden: Optional[torch.Tensor] = None,
                distill: float = 0.0) -> torch.Tensor:
        if targets is not None and teacher_hidden is not None:
            return linear_distillation_loss(hidden, teacher_hidden, self.weight, targets, distill,
                                            valid_vocab_size=self.valid_vocab_size)
        if targets is not None:
            return linear_cross_entropy(hidden, self.weight, targets, reduction=reduction,
                                        valid_vocab_size=self.valid_vocab_size)
        logits = super().forward(hidden)
        if self.valid_vocab_size is not None:
            # In place: the head's matmul keeps nothing of its output for backward, so no second logits copy.
            logits[..., self.valid_vocab_size:] = float("-inf")
        return logits


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
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, cfg.valid_vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.lora.rank:
            apply_lora(self, cfg.lora)  # LoRA on its targets, every other parameter frozen (model/lora.py)
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
            if isinstance(module, LoRALinear):
                module.reset_lora()
        for name, param in self.named_parameters():
            if name.rsplit(".", 2)[-2] in RESIDUAL_PROJECTIONS:
                param.div_(math.sqrt(2 * len(self.blocks)))

    def forward(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, sp=None,
                labels: Optional[torch.Tensor] = None, reduction: str = "mean", distill: float = 0.0) -> torch.Tensor:
        """Logits [B, T, vocab], padding ids (valid_vocab_size and up) at -inf; or, given labels [B, T] (-100:
        not scored), the cross entropy without the logits ever existing whole (model/loss.py): fp32, the
        mean or sum over scored tokens, or per token ([B, T], no gradient) with reduction='none'.
        cu_seqlens (int32 [N+1] over the flattened B*T tokens, every row start included) isolates packed
        documents; sp is the sequence-parallel context of this batch. distill > 0 (with labels, and LoRA: the base
        weights frozen) adds distill x KL(teacher || model) per token, the teacher being this model in teacher_mode
        (the Transformer it was linearized from, model/liger.py), run first without gradients."""
        if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32):
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if distill:
            if labels is None or reduction != "mean" or not self.config.lora.rank:
                raise ValueError("distill needs labels, reduction='mean' and LoRA (the frozen base is the teacher)")
            with torch.no_grad(), liger.teacher_mode(self):
                teacher_hidden = self.norm(self._hidden(input_ids, cu_seqlens, sp, None))
            return self.lm_head(self.norm(self._hidden(input_ids, cu_seqlens, sp, None)), labels,
                                teacher_hidden=teacher_hidden, distill=distill)
        return self._run(input_ids, cu_seqlens, sp, None, labels, reduction)

    def _run(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor], sp, caches: Optional[list[dict]],
             labels: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        return self.lm_head(self.norm(self._hidden(input_ids, cu_seqlens, sp, caches)), labels, reduction)

    def _hidden(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor], sp,
                caches: Optional[list[dict]]) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.config.lora.rank and torch.is_grad_enabled() and not x.requires_grad:
            # LoRA freezes the embedding. Without a gradient to the first block's input, ZeRO-3's backward hook of
            # that block fires at its output and frees its parameters before LoRA's gradients are accumulated
            x.requires_grad_()
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens=cu_seqlens, sp=sp, cache=None if caches is None else caches[i])
        return x

    # --- generation -------------------------------------------------------------------------------
    def init_state(self, batch_size: int, max_len: int) -> DecodeState:
        """A generation state for batch_size rows of up to max_len tokens, allocated once: each attention
        layer's KV cache [B, max_len (a window: min(window, max_len)), H_kv, D], each recurrent layer's state
        and conv window (independent of max_len), and the rows' lengths (all 0)."""
        if self.config.is_encoder:
            encoder_only("init_state (decoding, generation)")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"init_state: need batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        caches = [block.mixer.init_cache(batch_size, max_len) for block in self.blocks]
        return DecodeState(caches, torch.zeros(batch_size, dtype=torch.long, device=self.embed.weight.device),
                           max_len)

    def step(self, token_ids: torch.Tensor, state: DecodeState, lengths: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advance the rows of `state` in place. token_ids [B]: one decode step, logits [B, vocab] (no host
        sync, a fixed set of operations: CUDA-graph capturable). token_ids [B, T]: a prefill with the chunked
        kernels, logits [B, T, vocab]; `lengths` [B] (optional) are the rows' prompt lengths when they are
        right-padded (logits past a row's length are meaningless); with labels [B, T], the prefill's per-token
        losses [B, T] instead (no logits built, model/loss.py)."""
        if token_ids.dim() == 1:
            return self.decode_step(token_ids, state)
        return self.prefill(token_ids, state, lengths, labels=labels)

    def decode_step(self, token_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One token per row at the rows' own positions (state.lengths, then advanced by one)."""
        positions = state.lengths
        x = self.embed(token_ids)
        for block, cache in zip(self.blocks, state.caches):
            x = block(x, cache=cache, positions=positions)
        state.lengths.add_(1)
        return self.lm_head(self.norm(x))

    def prefill(self, token_ids: torch.Tensor, state: DecodeState, lengths: Optional[torch.Tensor] = None,
                last_only: bool = False, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run prompts [B, T] (right-padded to T when `lengths` [B] differ) through the chunked path from each
        row's current length, writing the caches in place; logits [B, T, vocab], or with last_only those of
        each row's last prompt token [B, vocab] (a long prompt's full logits would dwarf the model). Rows are
        grouped into runs sharing their current and prompt lengths; each run is one batched call on a view
        of the state."""
        B, T = token_ids.shape
        hidden = None
        for rows, start, length in prefill_groups(state, T, lengths):
            run_hidden = self._hidden(token_ids[rows, :length], None, None, state.view_rows(rows, start))
            if hidden is None:
                hidden = run_hidden.new_zeros(B, *(() if last_only else (T,)), run_hidden.shape[-1])
            hidden[rows] = run_hidden[:, -1] if last_only else F.pad(run_hidden, (0, 0, 0, T - length))
            state.lengths[rows] += length
        if labels is not None:
            return self.lm_head(self.norm(hidden), labels, "none")
        return self.lm_head(self.norm(hidden))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, generator: Optional[torch.Generator] = None,
                 prompt_lengths: Optional[torch.Tensor] = None, stop_tokens: tuple[int, ...] = (),
                 max_len: Optional[int] = None, cuda_graph: Union[bool, str] = True,
                 timings: Optional[dict] = None) -> torch.Tensor:
        """Prompts [B, T] (right-padded when prompt_lengths [B] differ) -> [B, T + max_new_tokens]: row b holds
        its prompt, then its generated tokens from position prompt_lengths[b], then the pad (0) after its end.
        temperature 0 is greedy; top_k > 0 keeps the k likeliest tokens, top_p < 1 the smallest set with that
        much mass. A row ends after a stop token (repeated to the row's end) or at max_len tokens (default
        the longest prompt + max_new_tokens). cuda_graph: on CUDA, True replays one decode step captured as
        a CUDA graph per (batch, max_len), "compile" uses torch.compile(mode="reduce-overhead"), False eager;
        ignored on other devices. `timings` (a dict) receives the prefill's and the decoding's seconds."""
        return decode_loop(self, input_ids, max_new_tokens, temperature, top_p, top_k, generator, prompt_lengths,
                           stop_tokens, max_len, cuda_graph, timings)

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
