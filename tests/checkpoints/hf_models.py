"""Tiny random Hugging Face models and tokenizers built with transformers / tokenizers (nothing downloaded),
saved as a model directory the way the hub serves them; and a process that loads exports without Baton."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

VOCAB = 320
TEXT = ("def recurrent_state(self, chunk):\n    return self.decay * state + key * value\n"
        "class Baton:\n    passes the state between ranks and documents\n") * 20


def make_tokenizer(directory: Path, vocab_size: int = VOCAB, extra_special_tokens: tuple[str, ...] = ()) -> None:
    """A byte-level BPE tokenizer.json with <s>, </s>, <pad> (and extra_special_tokens after them), and the
    tokenizer_config.json naming the first three."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>", *extra_special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))


ARCHITECTURES = {
    # GQA, untied, Llama-3 rope scaling and biases on every projection
    "llama": dict(cls="LlamaForCausalLM", config="LlamaConfig", attention_bias=True, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(cls="MistralForCausalLM", config="MistralConfig", sliding_window=7, tie_word_embeddings=False),
    "qwen2": dict(cls="Qwen2ForCausalLM", config="Qwen2Config", tie_word_embeddings=True),
    "qwen3": dict(cls="Qwen3ForCausalLM", config="Qwen3Config", tie_word_embeddings=False),
}


def make_hf_model(kind: str, directory: Path, seed: int = 0, **settings):
    """A random `kind` causal LM (2 layers, d 64, 4 query / 2 KV heads) saved in `directory` with a tokenizer;
    returns the transformers model (fp32, eval)."""
    import transformers

    options = dict(ARCHITECTURES[kind])
    cls, config_cls = options.pop("cls"), options.pop("config")
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, **{**options, **settings})
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).float().eval()
    with torch.no_grad():  # norms and biases off their init values, so every tensor matters
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    make_tokenizer(directory)
    return model


def run_without_baton(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -c script *args` in tmp_path, outside the repository and without PYTHONPATH, so nothing of Baton is
    importable (what a machine with only torch and transformers sees), offline, with its own module cache for the
    remote code trust_remote_code copies."""
    env = {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
