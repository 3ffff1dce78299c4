"""The exported Hugging Face code's Liger mixer (checkpoints/hf/remote/baton_liger.py, letter Z) against Baton's
(model/liger.py): the same logits, a prompt then single tokens through the cache past the window, Baton's greedy
tokens; and a LoRA model exported with format=hf holds the merged weights and gives the LoRA model's logits."""
import dataclasses

import pytest
import torch

import checkpoints
from checkpoints.hf.remote.configuration_baton import BatonConfig
from checkpoints.hf.remote.modeling_baton import BatonForCausalLM
from model import LM

VOCAB = 97
SEQ_LEN, PROMPT_LEN, NEW_TOKENS = 37, 20, 8
TOLERANCE = 1e-5
ATTENTION = dict(num_heads=4, num_kv_heads=2)
IMPORTED = dict(ATTENTION, qkv_bias=True, out_bias=True, qk_norm=True, rope_theta=500.0,
                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=16))
CASES = {  # id: (pattern, settings); windows shorter than the prompt, so the cache holds a wrapped window
    "Z": ("Z", dict(attention=ATTENTION, liger=dict(window=5))),
    "Z-scalar": ("Z", dict(attention=ATTENTION, liger=dict(window=5, gate="scalar", mix=0.7))),
    "Z-imported": ("Z", dict(attention=IMPORTED, liger=dict(window=7))),
    "ZA-tied": ("ZA", dict(attention=ATTENTION, liger=dict(window=5), tie_embeddings=True)),
}


def build_lm(case: str, lora: int = 0, seed: int = 0) -> LM:
    pattern, settings = CASES[case]
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, d_model=64, d_ff=128, pattern=pattern, n_layers=2 * len(pattern),
                  tie_embeddings=False, lora=dict(rank=lora, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    lm = LM.from_config(config | settings).eval()
    with torch.no_grad():
        for param in lm.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return lm


def exported(lm: LM) -> BatonForCausalLM:
    model = BatonForCausalLM(BatonConfig(baton=dataclasses.asdict(lm.config)))
    model.load_state_dict(lm.state_dict())
    return model.eval()


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_logits_and_the_cache_past_the_window_match_baton(case):
    lm = build_lm(case)
    ids = token_ids()
    expected = lm(ids)
    assert expected.abs().amax() > 1
    model = exported(lm)
    assert (model(ids, use_cache=False).logits - expected).abs().amax() <= TOLERANCE
    out = model(ids[:, :PROMPT_LEN])
    cache, logits = out.past_key_values, [out.logits]
    for position in range(PROMPT_LEN, SEQ_LEN):
        logits.append(model(ids[:, position:position + 1], past_key_values=cache).logits)
    assert (torch.cat(logits, 1) - expected).abs().amax() <= TOLERANCE
    window = lm.config.liger.window
    assert cache.states[0]["k"].shape[1] == window - 1 and cache.states[0]["recurrent"].shape == (1, 4, 16, 16)


@pytest.mark.parametrize("case", ["Z", "ZA-tied"])
@torch.no_grad()
def test_greedy_generate_gives_baton_tokens(case):
    lm = build_lm(case)
    prompt = token_ids()[:, :PROMPT_LEN]
    expected = lm.generate(prompt, NEW_TOKENS, temperature=0)
    assert torch.equal(exported(lm).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False), expected)


@pytest.mark.parametrize("case", ["Z-imported", "ZA-tied"])
@torch.no_grad()
def test_a_lora_model_exports_merged(case, tmp_path):
    lm = build_lm(case, lora=4)
    checkpoints.write_export(lm, tmp_path / "export", None, None, {}, format="hf")
    model, info = BatonForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not any(info.values()), info  # no LoRA tensors left over, none missing
    assert model.config.baton["lora"]["rank"] == 0
    ids = token_ids()
    expected = lm(ids)
    assert (model(ids).logits - expected).abs().amax() <= TOLERANCE
    for name, param in lm.named_parameters():  # the base weights alone (what dropping LoRA would export)
        if name.endswith("lora_B"):
            param.zero_()
    assert (lm(ids) - expected).abs().amax() > 0.1
