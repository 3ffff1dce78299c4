"""A Baton model as a directory `transformers` loads on a machine without Baton.

- A pure-attention model is a plain transformers model (Llama, or Mistral / Qwen2 / Qwen3 when it uses their
  options: checkpoints/hf/architectures.py), no remote code; its vocabulary is cut to the tokenizer's
  (valid_vocab_size: the rows past it are padding Baton never scores).
- Any other model ships the self-contained modeling code of checkpoints/hf/remote/ (torch and transformers
  only: every mixer's PyTorch reference path, the recurrent state as generate's cache), config.json with
  `auto_map` so AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) finds it, and Baton's own
  weights under Baton's names.
- An encoder (model.bidirectional, LION) is the same remote code as a masked LM, attention-only ones included:
  AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True); its mask id (data/mlm.py: the first id past
  the tokenizer's) is the config's mask_token_id and the tokenizer's `<mask>`.
All carry the tokenizer files and export.json; the directory is written beside `out` and renamed when whole (a
failure removes it: nothing is left behind).
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
from data.tokenizer import Tokenizer, tokenizer_file_name

REMOTE_CODE = Path(__file__).resolve().parent / "remote"
AUTO_CONFIG = {"AutoConfig": "configuration_baton.BatonConfig"}
CAUSAL_LM, MASKED_LM = "BatonForCausalLM", "BatonForMaskedLM"
AUTO_CLASS = {CAUSAL_LM: "AutoModelForCausalLM", MASKED_LM: "AutoModelForMaskedLM"}
WEIGHTS, CONFIG, INFO = "model.safetensors", "config.json", "export.json"
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
MASK_TOKEN = "<mask>"


def is_plain_attention(model_config) -> bool:
    """Whether the model exports as a plain transformers class (no remote code)."""
    try:
        hf_architecture(model_config)
    except CheckpointError:
        return False
    return True


def encoder_mask_id(model_config, tokenizer) -> int | None:
    """The id masked-LM training replaced tokens by (data/mlm.py mlm_vocab): the first past the data's vocabulary,
    which the model config records as valid_vocab_size; None without either (an encoder not trained by train.py).
    A tokenizer with another vocabulary is not the model's: a one-line CheckpointError."""
    mask_id = model_config.valid_vocab_size
    if tokenizer is not None and tokenizer.vocab_size != mask_id:
        raise CheckpointError(f"format=hf: the tokenizer has {tokenizer.vocab_size} ids but the encoder's mask id "
                              f"(model.valid_vocab_size, the first id past its training data's) is {mask_id}: not "
                              "the tokenizer it was trained with")
    return mask_id


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


def write_remote(model, directory: Path, tokenizer, mask_id: int | None) -> str:
    """Baton's weights under Baton's names with the remote modeling code; returns the class (the masked LM for an
    encoder, whose mask_id the config records)."""
    for source in sorted(REMOTE_CODE.glob("*.py")):
        if source.name != "__init__.py":
            shutil.copyfile(source, directory / source.name)
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
    hf_class = MASKED_LM if model.config.is_encoder else CAUSAL_LM
    config = {"architectures": [hf_class], "model_type": "baton",
              "auto_map": AUTO_CONFIG | {AUTO_CLASS[hf_class]: f"modeling_baton.{hf_class}"},
              "baton": dataclasses.asdict(model.config), "vocab_size": model.config.vocab_size,
              "hidden_size": model.config.d_model, "num_hidden_layers": len(model.config.layer_mixers()),
              "tie_word_embeddings": model.config.tie_embeddings, "dtype": "float32",
              **special_token_ids(tokenizer), **({} if mask_id is None else {"mask_token_id": mask_id})}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return hf_class


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
    hf.save(str(directory / TOKENIZER))
    specials = {f"{kind}_token": tokenizer.sp.id_to_piece(getattr(tokenizer, f"{kind}_id"))
                for kind in ("eos", "pad") if getattr(tokenizer, f"{kind}_id") >= 0}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, **specials,
              "unk_token": tokenizer.sp.id_to_piece(tokenizer.sp.unk_id()), "add_bos_token": True}
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))


def add_mask_token(directory: Path, mask_id: int) -> None:
    """MASK_TOKEN as a special token of the exported tokenizer.json at mask_id (the first id past its vocabulary,
    checked by encoder_mask_id) and its tokenizer_config.json's mask_token, so `tokenizer.mask_token_id` is the
    model's mask id."""
    from tokenizers import AddedToken, Tokenizer

    hf = Tokenizer.from_file(str(directory / TOKENIZER))
    hf.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    if hf.token_to_id(MASK_TOKEN) != mask_id:  # the vocabulary has a piece of that name already
        raise CheckpointError(f"format=hf: the tokenizer already has a token {MASK_TOKEN!r} (id "
                              f"{hf.token_to_id(MASK_TOKEN)}), so the mask id {mask_id} cannot take that name")
    hf.save(str(directory / TOKENIZER))
    config_path = directory / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config_path.write_text(json.dumps(config | {"mask_token": MASK_TOKEN}, indent=2))


def write_hf_export(model, out: Path, tokenizer, info: dict) -> Path:
    """Export `model` (whole, in this process) to `out` in Hugging Face form; the caller checked `out` is new."""
    encoder = model.config.is_encoder
    mask_id = encoder_mask_id(model.config, tokenizer) if encoder else None  # checked before anything is written
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model = model.float()
        plain = not encoder and is_plain_attention(model.config)  # transformers' plain classes are causal LMs
        hf_class = write_plain(model, tmp, tokenizer) if plain else write_remote(model, tmp, tokenizer, mask_id)
        if isinstance(tokenizer, Tokenizer):  # Baton's own sentencepiece model
            write_sentencepiece_as_hf(tokenizer, tmp)
        elif tokenizer is not None:  # a Hugging Face tokenizer (an imported model's): as it came
            for file in tokenizer.files():
                shutil.copyfile(file, tmp / (tokenizer_file_name(file) if file == tokenizer.path else file.name))
        if tokenizer is not None and mask_id is not None:
            add_mask_token(tmp, mask_id)
        (tmp / INFO).write_text(json.dumps({**info, "format": "hf", "hf_class": hf_class}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty, checked by the caller
    os.replace(tmp, out)
    return out
