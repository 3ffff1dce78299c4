"""Schema of the `model` config group: the layer pattern and each mixer's settings.

A model is a stack of pre-norm blocks; `pattern` names each block's token mixer with one letter
(G=gla, M=mamba2, D=gated_deltanet, E=deltanet, P=gated_deltaproduct, R=rglru, U=pararnn_gru, L=pararnn_lstm,
X=mlstm, A=attention, W=sliding-window attention, F/N/B=LION-LIT/-D/-S: model/registry.py, where each mixer registers
its letter and its settings' key). `bidirectional` makes the model an encoder (model/bidirectional.py). A pattern shorter than `n_layers` repeats, so `pattern: GGGA, n_layers: 24` is six GGGA groups.
Impossible values raise a
one-line ValueError naming the key, so a bad preset fails before any weight is built.

`vocab_size: null` (every preset) follows the data: train.py sets it from the data's tokenizer with
`vocab_for_data`, rounded up to a multiple of 128; the ids the rounding adds are never produced.
"""
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from configs.errors import ConfigError
from model.registry import MIXERS, by_letter

VOCAB_MULTIPLE = 128  # a vocabulary that follows the data is padded to this: whole matmul tiles, even shards


@dataclass
class RopeScalingConfig:
    """Llama 3's rotary scaling for long contexts (model.layers.rope_frequencies), as its checkpoints set it."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def check(self) -> None:
        if not (self.factor >= 1 and 0 < self.low_freq_factor < self.high_freq_factor
                and self.original_max_position_embeddings >= 1):
            raise ConfigError("model.attention.rope_scaling: need factor >= 1, 0 < low_freq_factor < "
                              "high_freq_factor and original_max_position_embeddings >= 1")


@dataclass
class AttentionConfig:
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: as many as num_heads (no grouping)
    head_dim: Optional[int] = None  # None: d_model // num_heads
    window: int = 256  # keys a query sees in W layers, itself included
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None  # None: plain RoPE
    # What imported checkpoints carry (checkpoints/hf): biases on the q/k/v projections (Qwen2) and on the
    # output projection (Llama's attention_bias), RMSNorms of each head's query and key before RoPE (Qwen3).
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False

    def check(self, d_model: int) -> None:
        if self.num_heads < 1 or (self.num_kv_heads is not None and self.num_kv_heads < 1):
            raise ConfigError("model.attention.num_heads and num_kv_heads must be >= 1")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.attention.num_heads={self.num_heads} must be a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and d_model % self.num_heads:
            raise ConfigError(f"model.attention.num_heads={self.num_heads} must divide d_model={d_model} "
                              "(or set model.attention.head_dim)")
        if (self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2)) or (
                self.head_dim is None and (d_model // self.num_heads) % 2):
            raise ConfigError("model.attention.head_dim must be even (rotary embeddings rotate pairs)")
        if self.window < 1:
            raise ConfigError(f"model.attention.window must be >= 1, got {self.window}")
        if self.rope_scaling is not None:
            self.rope_scaling.check()


@dataclass
class GLAConfig:
    num_heads: int = 4
    expand_k: float = 0.5  # key dim = expand_k * d_model, as in the GLA paper
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0  # log gate = logsigmoid(.) / normalizer keeps decays near 1
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True

    def check(self, d_model: int) -> None:
        key_dim, value_dim = int(d_model * self.expand_k), int(d_model * self.expand_v)
        if self.num_heads < 1 or key_dim % self.num_heads or value_dim % self.num_heads or key_dim == 0:
            raise ConfigError(f"model.gla.num_heads={self.num_heads} must divide the key dim {key_dim} and the "
                              f"value dim {value_dim} (d_model * expand_k / expand_v)")
        if self.gate_low_rank_dim < 1 or self.gate_logit_normalizer <= 0:
            raise ConfigError("model.gla.gate_low_rank_dim must be >= 1 and gate_logit_normalizer > 0")
        if self.use_short_conv and self.conv_size < 2:
            raise ConfigError(f"model.gla.conv_size must be >= 2, got {self.conv_size}")


def check_dt_init(key: str, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    if not 0 < dt_min <= dt_max or dt_init_floor <= 0:
        raise ConfigError(f"model.{key}: need 0 < dt_min <= dt_max and dt_init_floor > 0")


@dataclass
class Mamba2Config:
    expand: int = 2
    head_dim: int = 64
    d_state: int = 128
    n_groups: int = 1
    conv_size: int = 4
    # The step sizes dt start log-uniform in [dt_min, dt_max] (model.recurrent.init_dt_bias_).
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # Negative eigenvalues (Grazzi et al. 2025): the transition 2 exp(dt A) - 1 in (-1, 1) instead of
    # exp(dt A) in (0, 1), so a state can flip sign each step (parity and other state tracking).
    allow_neg_eigval: bool = False

    def check(self, d_model: int) -> None:
        d_inner = self.expand * d_model
        if self.expand < 1 or self.head_dim < 1 or d_inner % self.head_dim:
            raise ConfigError(f"model.mamba2.head_dim={self.head_dim} must divide expand * d_model = {d_inner}")
        if self.d_state < 1 or self.n_groups < 1 or (d_inner // self.head_dim) % self.n_groups:
            raise ConfigError(f"model.mamba2.n_groups={self.n_groups} must divide the number of heads "
                              f"{d_inner // self.head_dim} (and d_state must be >= 1)")
        if self.conv_size < 2:
            raise ConfigError(f"model.mamba2.conv_size must be >= 2, got {self.conv_size}")
        check_dt_init("mamba2", self.dt_min, self.dt_max, self.dt_init_floor)


@dataclass
class DeltaNetConfig:
    """The delta rule without a gate (DeltaNet, Yang et al. 2024): S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T."""
    key: ClassVar[str] = "deltanet"  # its ModelConfig field, for the error messages
    num_heads: int = 4
    head_dim: int = 64  # key (and query) head dim; value head dim = expand_v * head_dim
    expand_v: float = 2.0
    conv_size: int = 4
    use_output_gate: bool = True
    allow_neg_eigval: bool = False  # beta in (0, 2): transitions with negative eigenvalues (Grazzi et al. 2025)

    def check(self, d_model: int) -> None:
        if self.num_heads < 1 or self.head_dim < 1 or int(self.head_dim * self.expand_v) < 1:
            raise ConfigError(f"model.{self.key}.num_heads, head_dim and head_dim * expand_v must be >= 1")
        if self.conv_size < 2:
            raise ConfigError(f"model.{self.key}.conv_size must be >= 2, got {self.conv_size}")


@dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    """The delta rule with Mamba2's scalar decay a_t per head and step (Gated DeltaNet)."""
    key: ClassVar[str] = "gated_deltanet"
    # The decay's step sizes start as Mamba2's do (model.recurrent.init_dt_bias_).
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_dt_init(self.key, self.dt_min, self.dt_max, self.dt_init_floor)


@dataclass
class GatedDeltaProductConfig(GatedDeltaNetConfig):
    """Gated DeltaProduct (Siems et al. 2025): num_householder delta-rule steps per token (each its own key,
    value and beta), the decay applied once per token."""
    key: ClassVar[str] = "gated_deltaproduct"
    num_householder: int = 2

    def check(self, d_model: int) -> None:
        super().check(d_model)
        if self.num_householder < 1:
            raise ConfigError(f"model.gated_deltaproduct.num_householder must be >= 1, got {self.num_householder}")


@dataclass
class RGLRUConfig:
    num_heads: int = 4  # blocks of the block-diagonal gates
    width: Optional[int] = None  # D_RNN, the recurrence's width; None: 4/3 d_model rounded up to a multiple of 64
    conv_size: int = 4

    def recurrent_width(self, d_model: int) -> int:
        return self.width if self.width is not None else 64 * -(-4 * d_model // (3 * 64))

    def check(self, d_model: int) -> None:
        width = self.recurrent_width(d_model)
        if self.num_heads < 1 or width < 1 or width % self.num_heads:
            raise ConfigError(f"model.rglru.num_heads={self.num_heads} must divide the width {width}")
        if self.conv_size < 2:
            raise ConfigError(f"model.rglru.conv_size must be >= 2, got {self.conv_size}")


@dataclass
class ParaRNNConfig:
    """The nonlinear RNNs solved by Newton's method (model/pararnn.py), GRU (U) and LSTM (L) cells alike."""
    num_heads: int = 4  # how the state is laid out (its [N, H, D] blocks, as sequence parallelism moves them)
    width: Optional[int] = None  # the recurrence's width; None: d_model
    newton_tol: float = 1e-5  # stop when no state moved by more than this (relative to the largest) in an iteration
    newton_max_iters: int = 16  # scans per forward at most, the last differentiable one included
    # far from the solution each Jacobian block's norm is bounded by this (damped Newton); None: plain Newton
    newton_damping: Optional[float] = 1.0
    # the L cell: "peephole" (gates read c; diagonal Jacobian), "hc" (the paper's: gates read h, state (h, c), 2x2
    # Jacobian blocks), "cifg" ("hc" with i = 1 - f)
    lstm: str = "peephole"

    def recurrent_width(self, d_model: int) -> int:
        return self.width if self.width is not None else d_model

    def check(self, d_model: int) -> None:
        width = self.recurrent_width(d_model)
        if self.num_heads < 1 or width < 1 or width % self.num_heads:
            raise ConfigError(f"model.pararnn.num_heads={self.num_heads} must divide the width {width}")
        if not self.newton_tol > 0 or self.newton_max_iters < 1:
            raise ConfigError(f"model.pararnn.newton_tol must be > 0 and newton_max_iters >= 1, got "
                              f"{self.newton_tol} and {self.newton_max_iters}")
        if self.newton_damping is not None and not self.newton_damping > 0:
            raise ConfigError(f"model.pararnn.newton_damping must be > 0 or null, got {self.newton_damping}")
        if self.lstm not in ("peephole", "hc", "cifg"):
            raise ConfigError(f"model.pararnn.lstm must be one of peephole, hc, cifg; got {self.lstm!r}")


@dataclass
class MLSTMConfig:
    """The mLSTM layer (model/mlstm.py), as xLSTM 7B builds it."""
    num_heads: int = 4
    expand_qk: float = 0.5  # query/key dim = expand_qk * d_model (xLSTM 7B: 0.5)
    expand_v: float = 1.0
    gate_soft_cap: float = 15.0  # the gates' pre-activations pass through cap * tanh(x / cap)
    input_gate_bias: float = -10.0  # exp(i) ~ 5e-5 at the start: writes grow as training opens the gate
    forget_gate_bias_min: float = 3.0  # each head's forget gate bias is drawn uniformly in [min, max]
    forget_gate_bias_max: float = 6.0

    def check(self, d_model: int) -> None:
        key_dim, value_dim = int(d_model * self.expand_qk), int(d_model * self.expand_v)
        if self.num_heads < 1 or key_dim % self.num_heads or value_dim % self.num_heads or key_dim == 0:
            raise ConfigError(f"model.mlstm.num_heads={self.num_heads} must divide the key dim {key_dim} and the "
                              f"value dim {value_dim} (d_model * expand_qk / expand_v)")
        if not self.gate_soft_cap > 0 or self.forget_gate_bias_min > self.forget_gate_bias_max:
            raise ConfigError("model.mlstm.gate_soft_cap must be > 0 and forget_gate_bias_min <= _max")


# --- Liger (letter Z, model/liger.py) and LoRA (model/lora.py) ------------------------------------------------
LIGER_GATES = ("gla", "scalar")
LORA_MIXER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # of attention-family mixers (A, W, Z)
LORA_MLP_TARGETS = ("gate_proj", "up_proj")


@dataclass
class LigerConfig:
    gate: str = "gla"  # gla: one decay per key channel; scalar: one per head
    window: int = 64  # keys the window branch sees, the query's own included
    mix: float = 0.5  # o = mix * recurrent + (1 - mix) * window attention
    gate_logit_normalizer: float = 16.0  # log decays divided by it: decays near 1, a long memory

    def check(self, d_model: int) -> None:
        if self.gate not in LIGER_GATES:
            raise ConfigError(f"model.liger.gate: '{self.gate}' is not one of {', '.join(LIGER_GATES)}")
        if self.window < 1 or not 0 <= self.mix <= 1 or self.gate_logit_normalizer <= 0:
            raise ConfigError(f"model.liger: need window >= 1, 0 <= mix <= 1 and gate_logit_normalizer > 0, got "
                              f"{self.window}, {self.mix}, {self.gate_logit_normalizer}")


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: no LoRA, every parameter trains
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])

    def check(self) -> None:
        if self.rank < 0 or self.alpha <= 0:
            raise ConfigError(f"model.lora: rank must be >= 0 (0: off) and alpha > 0, got {self.rank} and {self.alpha}")
        unknown = [t for t in self.targets if t not in LORA_MIXER_TARGETS + LORA_MLP_TARGETS]
        if self.rank and (unknown or not self.targets):
            raise ConfigError(f"model.lora.targets: {unknown or 'empty'}; choose among "
                              f"{', '.join(LORA_MIXER_TARGETS + LORA_MLP_TARGETS)}")
LION_FORMS = ("full", "chunk", "rnn")  # kernels/lion: the full attention, chunkwise and RNN forms
LION_VARIANTS = ("lit", "d", "s")


@dataclass
class LIONConfig:
    """LION (model/lion.py; letters F = LION-LIT, N = LION-D, B = LION-S), and the form every bidirectional
    recurrent layer runs in (LION's and, in an encoder, GLA's and Mamba2's)."""
    num_heads: int = 4
    expand_k: float = 1.0  # query/key width = expand_k * d_model (as attention's)
    expand_v: float = 1.0
    form: str = "chunk"  # full: the masked attention matrix (short inputs); chunk: linear (training); rnn: a constant state
    use_short_conv: bool = True  # a causal conv on q, k, v: LION's masks are symmetric, this tells left from right
    conv_size: int = 4
    # LION-D and LION-S start with per-head decays log-spaced over 1 - lambda in [1 - decay_max, 1 - decay_min]
    decay_min: float = 0.9
    decay_max: float = 0.999

    def check(self, d_model: int) -> None:
        key_dim, value_dim = int(d_model * self.expand_k), int(d_model * self.expand_v)
        if self.num_heads < 1 or key_dim % self.num_heads or value_dim % self.num_heads or key_dim == 0:
            raise ConfigError(f"model.lion.num_heads={self.num_heads} must divide the key dim {key_dim} and the "
                              f"value dim {value_dim} (d_model * expand_k / expand_v)")
        self.check_form()
        if self.use_short_conv and self.conv_size < 2:
            raise ConfigError(f"model.lion.conv_size must be >= 2, got {self.conv_size}")
        if not 0 < self.decay_min <= self.decay_max < 1:
            raise ConfigError(f"model.lion: need 0 < decay_min <= decay_max < 1, got {self.decay_min}, {self.decay_max}")

    def check_form(self) -> None:
        if self.form not in LION_FORMS:
            raise ConfigError(f"model.lion.form: '{self.form}' is not one of {', '.join(LION_FORMS)}")


@dataclass
class ModelConfig:
    name: str = "hybrid_tiny"
    vocab_size: Optional[int] = None  # None: the data's vocabulary, rounded up (see vocab_for_data)
    # Set by vocab_for_data when vocab_size exceeds the data's ids: ids >= this are padding, their logits -inf
    # (never sampled, never scored, never a label). None: every id is a token.
    valid_vocab_size: Optional[int] = None
    d_model: int = 256
    pattern: Any = "GGGA"  # a string of letters, or a list of letters / mixer names, one per layer
    n_layers: Optional[int] = None  # None: len(pattern); otherwise a multiple of it
    d_ff: Optional[int] = None  # SwiGLU hidden size; None: 8/3 d_model rounded up to a multiple of 256
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    expected_params: Optional[float] = None  # the preset's stated size; tests/model checks it is true
    gla: GLAConfig = field(default_factory=GLAConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    gated_deltanet: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)
    deltanet: DeltaNetConfig = field(default_factory=DeltaNetConfig)
    gated_deltaproduct: GatedDeltaProductConfig = field(default_factory=GatedDeltaProductConfig)
    rglru: RGLRUConfig = field(default_factory=RGLRUConfig)
    pararnn: ParaRNNConfig = field(default_factory=ParaRNNConfig)
    mlstm: MLSTMConfig = field(default_factory=MLSTMConfig)
    liger: LigerConfig = field(default_factory=LigerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # rank 0: off
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    # An encoder: every layer sees the whole sequence (LION; GLA, Mamba2 and attention in their bidirectional
    # form), trained with train.objective=mlm. null: true exactly when the pattern has a LION letter.
    bidirectional: Optional[bool] = None
    lion: LIONConfig = field(default_factory=LIONConfig)

    def __post_init__(self):
        for key in ("vocab_size", "d_model"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.valid_vocab_size is not None and not 1 <= self.valid_vocab_size <= (self.vocab_size or 0):
            raise ConfigError(f"model.valid_vocab_size={self.valid_vocab_size} must be in [1, model.vocab_size="
                              f"{self.vocab_size}]")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.norm_eps and model.init_std must be positive")
        if self.d_ff is not None and self.d_ff < 1:
            raise ConfigError(f"model.d_ff must be >= 1 or null, got {self.d_ff}")
        letters = _pattern_letters(self.pattern)
        if self.n_layers is not None and (self.n_layers < 1 or self.n_layers % len(letters)):
            raise ConfigError(f"model.n_layers={self.n_layers} must be a positive multiple of the pattern's "
                             f"length {len(letters)}")
        # Only the settings of the mixers the pattern uses: unused defaults never get in the way.
        for key in sorted({MIXERS[name].config_key for name in self.layer_mixers()}):
            getattr(self, key).check(self.d_model)
        self.lora.check()
        self._check_bidirectional()

    @property
    def is_encoder(self) -> bool:
        """Whether every layer sees the whole sequence (model.bidirectional, or null and a LION letter)."""
        if self.bidirectional is not None:
            return self.bidirectional
        return any(MIXERS[name].bidirectional == "always" for name in self.layer_mixers())

    def _check_bidirectional(self) -> None:
        modes = {name: MIXERS[name].bidirectional for name in self.layer_mixers()}
        if not self.is_encoder:
            always = sorted(name for name, mode in modes.items() if mode == "always")
            if always:
                raise ConfigError(f"model.bidirectional=false, but {', '.join(always)} only exists bidirectional "
                                  "(an encoder): leave model.bidirectional null or set it true")
            return
        never = sorted(name for name, mode in modes.items() if mode == "never")
        if never:
            able = ", ".join(f"{m.letter}={m.name}" for m in MIXERS.values() if m.bidirectional != "never")
            raise ConfigError(f"model.bidirectional: {', '.join(never)} has no bidirectional form (an encoder can "
                              f"use {able})")
        if "mamba2" in modes and self.mamba2.allow_neg_eigval:
            raise ConfigError("model.mamba2.allow_neg_eigval has no bidirectional form (model.bidirectional=true)")
        self.lion.check_form()

    def layer_mixers(self) -> list[str]:
        """The mixer name of every layer, the pattern repeated to n_layers."""
        letters = _pattern_letters(self.pattern)
        repeats = 1 if self.n_layers is None else self.n_layers // len(letters)
        mixers = by_letter()
        return [mixers[letter].name for letter in letters] * repeats

    def has_recurrent_layers(self) -> bool:
        return any(MIXERS[name].recurrent for name in self.layer_mixers())

    @property
    def mlp_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 256 * -(-(8 * self.d_model // 3) // 256)


def vocab_for_data(cfg: ModelConfig, data_vocab_size: int) -> dict:
    """model.vocab_size and model.valid_vocab_size for data whose ids are [0, data_vocab_size): vocab_size as
    set (a one-line ConfigError if the data has more ids), or (null) the data's rounded up to a multiple of
    VOCAB_MULTIPLE; valid_vocab_size marks where the padding starts (None: no padding)."""
    vocab = cfg.vocab_size if cfg.vocab_size is not None else VOCAB_MULTIPLE * -(-data_vocab_size // VOCAB_MULTIPLE)
    if vocab < data_vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the data's vocabulary {data_vocab_size} "
                          "(leave it null to follow the data)")
    return {"vocab_size": vocab, "valid_vocab_size": data_vocab_size if data_vocab_size < vocab else None}


def _pattern_letters(pattern: Any) -> list[str]:
    """Normalise a pattern (a string of letters or a list of letters / mixer names) to letters."""
    names = {mixer.name: letter for letter, mixer in by_letter().items()}
    if isinstance(pattern, str):
        items = list(pattern)
    elif isinstance(pattern, (list, tuple)) or type(pattern).__name__ == "ListConfig":
        items = [str(item) for item in pattern]
    else:
        raise ConfigError(f"model.pattern must be a string or a list, got {type(pattern).__name__}")
    if not items:
        raise ConfigError("model.pattern is empty: give one letter per layer, e.g. GGA")
    letters = []
    for item in items:
        letter = names.get(item, item)
        if letter not in names.values():
            known = ", ".join(f"{letter}={name}" for name, letter in names.items())
            raise ConfigError(f"model.pattern: letter '{item}' names no mixer (known: {known})")
        letters.append(letter)
    return letters
