"""The Hugging Face config of an exported Baton model: Baton's whole ModelConfig as one dict field `baton`
(`dataclasses.asdict` of model/config.py's ModelConfig: the layer pattern, sizes and one nested dict of settings
per mixer), plus the fields transformers itself reads, derived from it."""
from typing import Optional

from transformers import PretrainedConfig

# Each mixer's pattern letter and name, as Baton's mixers register them (model/registry.py).
MIXER_LETTERS = {"gla": "G", "mamba2": "M", "gated_deltanet": "D", "deltanet": "E", "gated_deltaproduct": "P",
                 "rglru": "R", "pararnn_gru": "U", "pararnn_lstm": "L", "mlstm": "X", "attention": "A",
                 "sliding_window": "W",
                 "liger": "Z", "lion_lit": "F", "lion_d": "N", "lion_s": "B"}
# The letters that exist only bidirectionally (LION): a pattern with one is an encoder unless `bidirectional` says.
ENCODER_LETTERS = ("F", "N", "B")


class BatonConfig(PretrainedConfig):
    """`baton` is the source of truth; vocab_size, hidden_size, num_hidden_layers and tie_word_embeddings follow
    from it whenever it is set (what a config.json says of them is overwritten), so the two never disagree.
    A config without `baton` exists only because transformers builds one to find its defaults."""

    model_type = "baton"

    baton: Optional[dict] = None
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None
    mask_token_id: Optional[int] = None  # an encoder's: the id masked-LM training replaced tokens by (data/mlm.py)
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.baton is not None:
            self.vocab_size = self.baton["vocab_size"]
            self.hidden_size = self.baton["d_model"]
            self.num_hidden_layers = len(self.layer_letters())
            self.tie_word_embeddings = self.baton["tie_embeddings"]
        super().__post_init__(**kwargs)

    def layer_letters(self) -> list[str]:
        """The mixer letter of every layer: the pattern (a string of letters, or a list of letters or mixer names)
        repeated to n_layers, as ModelConfig.layer_mixers does."""
        pattern, n_layers = self.baton["pattern"], self.baton["n_layers"]
        letters = [MIXER_LETTERS.get(str(item), str(item)) for item in pattern]
        unknown = sorted(set(letters) - set(MIXER_LETTERS.values()))
        if unknown:
            raise ValueError(f"baton.pattern names no known mixer: {unknown} (known: {MIXER_LETTERS})")
        return letters * (1 if n_layers is None else n_layers // len(letters))

    def is_encoder(self) -> bool:
        """Whether every layer sees the whole sequence (ModelConfig.is_encoder): `bidirectional`, or when it is
        null, whether the pattern has a LION letter."""
        if self.baton.get("bidirectional") is not None:
            return bool(self.baton["bidirectional"])
        return any(letter in ENCODER_LETTERS for letter in self.layer_letters())

    def mlp_hidden(self) -> int:
        """The SwiGLU hidden size: d_ff, or 8/3 d_model rounded up to a multiple of 256 (ModelConfig.mlp_hidden)."""
        if self.baton["d_ff"] is not None:
            return self.baton["d_ff"]
        return 256 * -(-(8 * self.baton["d_model"] // 3) // 256)
