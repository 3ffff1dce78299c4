"""An exported Baton language model for transformers, loaded with only torch and transformers installed:
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` for a causal model (BatonForCausalLM),
`AutoModelForMaskedLM` for an encoder (BatonForMaskedLM: bidirectional, trained with Baton's masked-LM objective).

The module tree is Baton's LM's (model/lm.py), name for name, so Baton's model.safetensors loads unchanged:
embed -> blocks.{i} (mixer_norm, mixer, mlp_norm, mlp: SwiGLU) -> norm -> lm_head (tied to embed when the config
ties them). Each block's mixer is chosen by its pattern letter (MIXERS) and follows baton_layers.py's interface:
forward(x, state) -> (y, state). Generation carries those states as the cache (BatonCache): the prompt runs once
as a whole, then one token per step from the states, as Baton's LM.generate does. An encoder's mixers see the
whole sequence both ways (LION, and GLA, Mamba2 and attention in their bidirectional form) and carry no state.
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput

from .baton_delta_rule import DeltaRuleMixer
from .baton_layers import RMSNorm, SwiGLU, apply_rotary, rope_frequencies
from .baton_liger import Liger
from .baton_linear_attention import GLA, MLSTM, Mamba2
from .baton_lion import LION
from .baton_rnn import ParaRNNMixer, RGLRUMixer
from .configuration_baton import BatonConfig


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE (model/attention.py): full (letter A) or a sliding window of
    `window` keys, the query's own included (W). Options Baton's imported checkpoints carry: biases on q/k/v
    (qkv_bias) and o (out_bias), each head's query and key RMS-normed before RoPE (qk_norm), Llama 3's rope_scaling.
    In an encoder every query sees every key (model/bidirectional.py; full attention only). State: {"k", "v": the
    rotated keys and values [B, S, H_kv, D] a next query may see (all of them, or a window's last window - 1),
    "length": the tokens seen}."""

    def __init__(self, config, letter: str):
        super().__init__()
        baton = config.baton
        a, d = baton["attention"], baton["d_model"]
        self.num_heads = a["num_heads"]
        self.num_kv_heads = a["num_kv_heads"] or a["num_heads"]
        self.head_dim = a["head_dim"] or d // a["num_heads"]
        self.rope_theta, self.rope_scaling = a["rope_theta"], a.get("rope_scaling")
        self.window = a["window"] if letter == "W" else None
        self.causal = not config.is_encoder()
        qkv_bias = a.get("qkv_bias", False)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=a.get("out_bias", False))
        self.q_norm = RMSNorm(self.head_dim, baton["norm_eps"]) if a.get("qk_norm", False) else None
        self.k_norm = RMSNorm(self.head_dim, baton["norm_eps"]) if a.get("qk_norm", False) else None

    def forward(self, x: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        start = 0 if state is None else state["length"]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = start + torch.arange(T, device=x.device)
        inv_freq = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling, x.device)
        q, k = apply_rotary(q, positions, inv_freq), apply_rotary(k, positions, inv_freq)
        if state is not None:
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        key_positions = torch.arange(start + T - k.shape[1], start + T, device=x.device)
        visible = key_positions[None, :] <= positions[:, None] if self.causal else None
        if self.window is not None:
            visible &= key_positions[None, :] > positions[:, None] - self.window
        groups = self.num_heads // self.num_kv_heads
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(groups, 1),
                                           v.transpose(1, 2).repeat_interleave(groups, 1), attn_mask=visible)
        kept = k.shape[1] if self.window is None else min(self.window - 1, k.shape[1])
        new_state = {"k": k[:, k.shape[1] - kept:], "v": v[:, v.shape[1] - kept:], "length": start + T}
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), new_state


# Each pattern letter's mixer, built from the config (the letters of Baton's model/registry.py).
MIXERS = {"G": GLA, "M": Mamba2, "X": MLSTM, "R": RGLRUMixer,
          **{letter: partial(DeltaRuleMixer, letter=letter) for letter in "DEP"},
          **{letter: partial(ParaRNNMixer, letter=letter) for letter in "UL"},
          **{letter: partial(Attention, letter=letter) for letter in "AW"},
          "Z": Liger,
          **{letter: partial(LION, letter=letter) for letter in "FNB"}}


class BatonBlock(nn.Module):
    """x + mixer(mixer_norm(x)), then + mlp(mlp_norm(.)): Baton's pre-norm block."""

    def __init__(self, config: BatonConfig, letter: str):
        super().__init__()
        baton = config.baton
        self.mixer_norm = RMSNorm(baton["d_model"], baton["norm_eps"])
        self.mixer = MIXERS[letter](config)
        self.mlp_norm = RMSNorm(baton["d_model"], baton["norm_eps"])
        self.mlp = SwiGLU(baton["d_model"], config.mlp_hidden())

    def forward(self, x: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        mixed, state = self.mixer(self.mixer_norm(x), state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class BatonCache:
    """The generation cache: each layer's mixer state (None before the first call) and the number of tokens seen.
    The model's forward takes it as `past_key_values`, advances it in place and returns it. Recurrent states
    cannot be rolled back, so it is neither croppable (assisted decoding) nor of a fixed shape (compiled decoding);
    its rows can be reordered (beam search)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.states: list[Optional[dict]] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i of every state becomes row beam_idx[i] (every tensor of a state has the batch first)."""
        self.states = [None if state is None else
                       {key: value.index_select(0, beam_idx.to(value.device)) if torch.is_tensor(value) else value
                        for key, value in state.items()}
                       for state in self.states]


class BatonPreTrainedModel(PreTrainedModel):
    """Baton's LM as either head class builds it: embed, the blocks, the final norm and the output head."""

    config_class = BatonConfig
    _no_split_modules = ["BatonBlock"]
    # Baton writes tied weights once, as embed.weight (safetensors keeps the first name in sorted order); transformers
    # ties lm_head.weight to it (or the other way round should only lm_head.weight be stored).
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: BatonConfig):
        super().__init__(config)
        baton = config.baton
        self.valid_vocab_size = baton["valid_vocab_size"]
        self.embed = nn.Embedding(baton["vocab_size"], baton["d_model"])
        self.blocks = nn.ModuleList(BatonBlock(config, letter) for letter in config.layer_letters())
        self.norm = RMSNorm(baton["d_model"], baton["norm_eps"])
        self.lm_head = nn.Linear(baton["d_model"], baton["vocab_size"], bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the last block's output, ids from valid_vocab_size on at -inf as Baton's LMHead makes them."""
        logits = self.lm_head(self.norm(hidden))
        if self.valid_vocab_size is not None:
            logits[..., self.valid_vocab_size:] = float("-inf")
        return logits


class BatonForCausalLM(BatonPreTrainedModel, GenerationMixin):
    def __init__(self, config: BatonConfig):
        if config.is_encoder():
            raise ValueError("this Baton model is an encoder (bidirectional, a masked LM): load it with "
                             "AutoModelForMaskedLM")
        super().__init__(config)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate must not build its DynamicCache (attention keys only): the first forward starts a BatonCache."""
        return False

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[BatonCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.LongTensor] = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] of input_ids [B, T] after the history in past_key_values (None: none), ids from
        valid_vocab_size on at -inf as Baton's LMHead makes them; logits_to_keep > 0 keeps only the last ones. With
        use_cache (the config's by default) the returned past_key_values continues the sequence. With labels, the
        mean next-token cross entropy (labels shifted inside, -100 not scored). An attention_mask may only mark
        every token (no padding: every row is one unpadded sequence). Other keyword arguments generate passes
        along (return_dict, output flags) change nothing: the output is always a CausalLMOutputWithPast."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("BatonForCausalLM does not support padding: attention_mask must be all ones (run "
                             "sequences of different lengths one at a time)")
        if past_key_values is not None and not isinstance(past_key_values, BatonCache):
            raise TypeError(f"past_key_values must be the BatonCache a previous call returned, got "
                            f"{type(past_key_values).__name__}")
        cache = past_key_values
        if cache is None and (self.config.use_cache if use_cache is None else use_cache):
            cache = BatonCache(len(self.blocks))
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x, state = block(x, None if cache is None else cache.states[i])
            if cache is not None:
                cache.states[i] = state
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        logits = self.head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)


class BatonForMaskedLM(BatonPreTrainedModel):
    """A Baton encoder (every layer sees the whole sequence). Rows may be padded on either side: each row's tokens
    (the run of ones in attention_mask) are encoded on their own, as Baton encodes a document, since padding next
    to a row would otherwise reach it through the backward direction and the normalisers."""

    def __init__(self, config: BatonConfig):
        if not config.is_encoder():
            raise ValueError("this Baton model is causal (not an encoder): load it with AutoModelForCausalLM")
        super().__init__(config)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, **kwargs) -> MaskedLMOutput:
        """Logits [B, T, vocab] of input_ids [B, T]: each row's tokens where attention_mask [B, T] (None: all) is 1,
        a contiguous run (right or left padding); a padding position's logits are those of a zero hidden state.
        With labels, the mean cross entropy over the positions whose label is not -100 (the masked-LM loss: no
        shift). Other keyword arguments (token_type_ids, output flags) change nothing."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(1)
        starts = attention_mask.int().argmax(1)
        positions = torch.arange(T, device=input_ids.device)
        spans = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
        if not torch.equal(spans, attention_mask.bool()):
            raise ValueError("BatonForMaskedLM: every row of attention_mask must be one run of ones (its tokens) "
                             "with padding before or after it")
        hidden = self.embed.weight.new_zeros(B, T, self.embed.embedding_dim)
        for start, length in sorted({(int(s), int(n)) for s, n in zip(starts, lengths) if n > 0}):
            rows = ((starts == start) & (lengths == length)).nonzero()[:, 0]
            x = self.embed(input_ids[rows, start:start + length])
            for block in self.blocks:
                x, _ = block(x, None)
            hidden[rows, start:start + length] = x
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(logits.device), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
