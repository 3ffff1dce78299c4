"""A Baton model as a directory `transformers` loads on a machine without Baton.

- A pure-attention model is a plain transformers model (Llama, or Mistral / Qwen2 / Qwen3 when it uses their
  options: checkpoints/hf/architectures.py), no remote code; its vocabulary is cut to the tokenizer's
  (valid_vocab_size: the rows past it are padding Baton never scores).
- Any other model ships the self-contained modeling code of checkpoints/hf/remote/ (torch and transformers
  only: every mixer's PyTorch reference path, the recurrent state as generate's cache), config.json with
  `auto_map` so AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) finds it, and Baton's own
  weights under Baton's names.
Both carry the tokenizer files and export.json; the directory is written beside `out` and renamed when whole.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file, save_model

from checkpoints.hf.architectures import hf_architecture, hf_config_dict, to_hf_name
from configs.errors import CheckpointError
from data.tokenizer import Tokenizer

REMOTE_CODE = Path(__file__).resolve().parent / "remote"
AUTO_MAP = {"AutoConfig": "configuration_baton.BatonConfig",
            "AutoModelForCausalLM": "modeling_baton.BatonForCausalLM"}
WEIGHTS, CONFIG, INFO = "model.safetensors", "config.json", "export.json"


def is_plain_attention(model_config) -> bool:
    """Whether the model exports as a plain transformers class (no remote code)."""
    try:
        hf_architecture(model_config)
    except CheckpointError:
        return False
    return True


def special_token_ids(tokenizer) -> dict:
    """The model config's special ids. Baton's own tokenizer starts every document with EOS (as training packs
    them), so EOS is also the begin-of-sequence token of its exports."""
    if tokenizer is None:
        return {}
    ids = {kind: getattr(tokenizer, f"{kind}_id") for kind in ("bos", "eos", "pad")}
    if isinstance(tokenizer, Tokenizer):
        ids["bos"] = tokenizer.eos_id
    return {f"{kind}_token_id": i for kind, i in ids.items() if i >= 0}


def write_plain(model, directory: Path, tokenizer) -> str:
    """A plain transformers checkpoint: HF names, the vocabulary cut to the tokenizer's; returns the class."""
    cfg = model.config
    arch = hf_architecture(cfg)
    vocab = cfg.valid_vocab_size or cfg.vocab_size
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: transformers ties it to the embedding on load
        if name in ("embed.weight", "lm_head.weight"):
            tensor = tensor[:vocab]
        tensors[to_hf_name(name)] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    config = hf_config_dict(cfg, arch, vocab) | special_token_ids(tokenizer) | {"dtype": "float32"}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return arch.hf_class


def write_remote(model, directory: Path, tokenizer) -> str:
    """Baton's weights under Baton's names with the remote modeling code; returns the class."""
    for source in sorted(REMOTE_CODE.glob("*.py")):
        if source.name != "__init__.py":
            shutil.copyfile(source, directory / source.name)
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
    config = {"architectures": ["BatonForCausalLM"], "model_type": "baton", "auto_map": AUTO_MAP,
              "baton": dataclasses.asdict(model.config), "vocab_size": model.config.vocab_size,
              "hidden_size": model.config.d_model, "num_hidden_layers": len(model.config.layer_mixers()),
              "tie_word_embeddings": model.config.tie_embeddings, "dtype": "float32",
              **special_token_ids(tokenizer)}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return "BatonForCausalLM"


def write_sentencepiece_as_hf(tokenizer, directory: Path) -> None:
    """Baton's sentencepiece model as tokenizer.json + tokenizer_config.json that AutoTokenizer loads without
    sentencepiece, giving the same ids: the same pieces (BPE with merges ranked as sentencepiece ranks them, or
    Unigram with its scores), byte fallback, spaces as U+2581 and no normalisation or dummy prefix (data/
    tokenizer.py trains it so). Encoding with special tokens prepends EOS: documents start with it in training
    (the packed rows' separator), so `tokenizer(text)` gives what the model was trained to continue."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extractor = SentencePieceExtractor(str(tokenizer.path))
    if extractor.proto.trainer_spec.model_type == 1:  # unigram
        pieces = [(p.piece, p.score) for p in extractor.proto.pieces]
        hf = Tokenizer(models.Unigram(pieces, unk_id=extractor.proto.trainer_spec.unk_id, byte_fallback=True))
    else:
        spec = extractor.extract(BPE)
        unk = tokenizer.sp.id_to_piece(tokenizer.sp.unk_id())
        hf = Tokenizer(models.BPE(vocab=spec["vocab"], merges=spec["merges"], unk_token=unk, byte_fallback=True,
                                  fuse_unk=True))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [i for i in range(tokenizer.vocab_size) if tokenizer.sp.is_control(i) or tokenizer.sp.is_unknown(i)]
    hf.add_special_tokens([tokenizer.sp.id_to_piece(i) for i in control])
    eos = tokenizer.sp.id_to_piece(tokenizer.eos_id)
    hf.post_processor = processors.TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A $B",
                                                      special_tokens=[(eos, tokenizer.eos_id)])
    hf.save(str(directory / "tokenizer.json"))
    specials = {f"{kind}_token": tokenizer.sp.id_to_piece(getattr(tokenizer, f"{kind}_id"))
                for kind in ("eos", "pad") if getattr(tokenizer, f"{kind}_id") >= 0}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, **specials,
              "unk_token": tokenizer.sp.id_to_piece(tokenizer.sp.unk_id()), "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_hf_export(model, out: Path, tokenizer, info: dict) -> Path:
    """Export `model` (whole, in this process) to `out` in Hugging Face form; the caller checked `out` is new."""
    if model.config.is_encoder:  # both export forms are causal LMs; a masked-LM export is not built
        raise CheckpointError("format=hf: the model is an encoder (bidirectional, trained with train.objective=mlm), "
                              "which has no Hugging Face export yet; format=baton exports it")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = model.float()
    plain = is_plain_attention(model.config)
    hf_class = write_plain(model, tmp, tokenizer) if plain else write_remote(model, tmp, tokenizer)
    if isinstance(tokenizer, Tokenizer):  # Baton's own sentencepiece model
        write_sentencepiece_as_hf(tokenizer, tmp)
    elif tokenizer is not None:  # a Hugging Face tokenizer (an imported model's): as it came
        for file in tokenizer.files():
            shutil.copyfile(file, tmp / file.name)
    (tmp / INFO).write_text(json.dumps({**info, "format": "hf", "hf_class": hf_class}, indent=1))
    if out.exists():
        out.rmdir()  # empty, checked by the caller
    os.replace(tmp, out)
    return out
