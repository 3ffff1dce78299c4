"""The exported Hugging Face code's model (checkpoints/hf/remote/modeling_baton.py, configuration_baton.py) and
its attention (A, W), GLA (G), Mamba2 (M) and mLSTM (X) mixers (baton_linear_attention.py) against Baton's LM.

Each case's BatonForCausalLM gets Baton's state_dict unchanged and must give Baton's logits, the same logits from
a prompt followed by single tokens through its cache, and Baton's greedy tokens from generate. Then the files as an
export ships them: weights written the way Baton writes them (tied once), and the folder loaded through
AutoModelForCausalLM with trust_remote_code in a process that cannot import Baton."""
import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
from checkpoints.hf.remote.configuration_baton import ENCODER_LETTERS, MIXER_LETTERS, BatonConfig
from checkpoints.hf.remote.modeling_baton import BatonCache, BatonForCausalLM
from model import LM
from tests.checkpoints.hf_models import run_without_baton
from tests.model.conftest import small_config

VOCAB = 97
SEQ_LEN, PROMPT_LEN, NEW_TOKENS = 37, 20, 8
TOLERANCE = 1e-5
REMOTE_CODE = Path(__file__).parents[2] / "checkpoints" / "hf" / "remote"
ATTENTION = dict(num_heads=4, num_kv_heads=2, window=5)  # grouped heads; W's window shorter than the sequences
MAMBA2 = dict(expand=2, head_dim=16, d_state=16, n_groups=2)
# id: (pattern, the mixers' settings). Small, and every option of each mixer at least once.
CASES = {
    "A": ("A", dict(attention=ATTENTION)),
    # what imported checkpoints carry: biases (Qwen2, Llama's attention_bias), Qwen3's qk norms, Llama 3's rope
    # scaling (original context 16 < SEQ_LEN: long wavelengths scaled, short kept, one on the ramp)
    "A-imported": ("A", dict(attention=dict(ATTENTION, qkv_bias=True, out_bias=True, qk_norm=True, rope_theta=500.0,
                                            rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                              original_max_position_embeddings=16)))),
    "W": ("W", dict(attention=ATTENTION)),
    "G": ("G", dict(gla=dict(num_heads=2, use_short_conv=True))),
    "G-plain": ("G", dict(gla=dict(num_heads=2, use_short_conv=False, use_output_gate=False))),
    "M": ("M", dict(mamba2=MAMBA2)),
    "M-neg-eigval": ("M", dict(mamba2=dict(MAMBA2, allow_neg_eigval=True))),
    "X": ("X", dict(mlstm=dict(num_heads=2, input_gate_bias=2.0))),  # writes of e^2: the stabiliser at work at once
    "GA-tied": ("GA", dict(gla=dict(num_heads=2, use_short_conv=True), attention=ATTENTION, tie_embeddings=True)),
}


def build_lm(case: str, seed: int = 0) -> LM:
    """An fp32 model of two repeats of the case's pattern (a state per layer) whose every parameter is its init plus
    N(0, 0.1) noise: gate biases, norm weights and the like away from their special init values, projections large
    enough that the outputs are of order one."""
    pattern, settings = CASES[case]
    torch.manual_seed(seed)
    lm = LM.from_config(dict(dict(vocab_size=VOCAB, d_model=64, d_ff=128, pattern=pattern, n_layers=2 * len(pattern),
                                  tie_embeddings=False), **settings)).eval()
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
def test_logits_match_baton(case):
    lm = build_lm(case)
    ids = token_ids()
    expected = lm(ids)
    assert expected.abs().amax() > 1  # logits of order one: the tolerance means something
    assert (exported(lm)(ids).logits - expected).abs().amax() <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prompt_then_tokens_through_the_cache_match_the_whole(case):
    model = exported(build_lm(case))
    ids = token_ids()
    whole = model(ids, use_cache=False)
    assert whole.past_key_values is None
    out = model(ids[:, :PROMPT_LEN])
    cache, logits = out.past_key_values, [out.logits]
    for position in range(PROMPT_LEN, SEQ_LEN):
        logits.append(model(ids[:, position:position + 1], past_key_values=cache).logits)
    assert isinstance(cache, BatonCache) and cache.get_seq_length() == SEQ_LEN
    assert (torch.cat(logits, 1) - whole.logits).abs().amax() <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_greedy_generate_gives_baton_tokens(case):
    lm = build_lm(case)
    prompt = token_ids()[:, :PROMPT_LEN]
    expected = lm.generate(prompt, NEW_TOKENS, temperature=0)
    generated = exported(lm).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, expected)


@torch.no_grad()
def test_beam_search_through_the_cache_matches_beam_search_without():
    """Beam search reorders the cache's rows (BatonCache.reorder_cache) each step: the beams it finds are those
    found by rerunning every whole sequence."""
    model = exported(build_lm("GA-tied"))
    prompt = token_ids()[:, :PROMPT_LEN]
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=3, num_return_sequences=3)
    assert torch.equal(model.generate(prompt, **settings), model.generate(prompt, use_cache=False, **settings))


@torch.no_grad()
def test_labels_give_baton_loss():
    """transformers' convention (labels are the inputs, shifted inside) gives Baton's mean next-token loss."""
    lm = build_lm("GA-tied")
    ids = token_ids()
    expected = lm(ids[:, :-1], labels=ids[:, 1:])
    assert (exported(lm)(ids, labels=ids).loss - expected).abs() <= TOLERANCE


def test_padding_is_refused_clearly():
    model = exported(build_lm("G"))
    ids = token_ids()
    with pytest.raises(ValueError, match="does not support padding"):
        model(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0))


def test_padding_ids_are_never_produced():
    """ids from valid_vocab_size on (the vocabulary rounded up past the tokenizer's) are -inf, as in Baton."""
    lm = build_lm("G")
    lm.config.valid_vocab_size = lm.lm_head.valid_vocab_size = 90
    logits = exported(lm)(token_ids()).logits
    assert torch.isneginf(logits[..., 90:]).all() and torch.isfinite(logits[..., :90]).all()


def test_the_remote_code_imports_only_torch_transformers_and_its_own_files():
    """What an export needs besides itself: torch and transformers (Python's standard library aside), no Baton,
    triton or omegaconf; siblings as `from .name import ...`, the only form transformers copies along."""
    siblings = {path.stem for path in REMOTE_CODE.glob("*.py")}
    for path in REMOTE_CODE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in siblings, f"{path.name}: {ast.unparse(node)}"
                continue
            elif isinstance(node, ast.ImportFrom):
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers"} | sys.stdlib_module_names, f"{path.name}: {ast.unparse(node)}"


def write_export(lm: LM, directory: Path) -> None:
    """The format=hf export (checkpoints/hf/exporter.py): Baton's weights as safetensors' save_model writes them
    (tied weights once), the config with its auto_map, and the remote code, flat."""
    checkpoints.write_export(lm, directory, None, None, {}, format="hf")


@pytest.mark.parametrize("case", ["GA-tied", "G"])
@torch.no_grad()
def test_from_pretrained_loads_tied_and_untied_weights_without_missing_keys(case, tmp_path):
    lm = build_lm(case)
    write_export(lm, tmp_path / "export")
    model, info = BatonForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert (model.lm_head.weight is model.embed.weight) == lm.config.tie_embeddings
    ids = token_ids()
    assert (model(ids).logits - lm(ids)).abs().amax() <= TOLERANCE


LOAD_WITHOUT_BATON = """
import importlib.util, json, sys, torch
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("kernels") is None, "Baton importable"
for name, expected in json.load(open(sys.argv[1])).items():
    model = AutoModelForCausalLM.from_pretrained(expected["export"], trust_remote_code=True)
    ids = torch.tensor(expected["prompt"])
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=len(expected["generated"][0]) - ids.shape[1], do_sample=False)
    reference = torch.tensor(expected["logits"])
    error = (logits - reference).abs().amax().item()
    # fp32 rounding of Baton's chunked scans against the step-by-step loops, relative to the logits' size
    assert ((logits - reference).abs() <= 1e-5 + 1e-5 * reference.abs()).all(), f"{name}: logits differ by {error}"
    assert generated.tolist() == expected["generated"], f"{name}: generated tokens differ"
    print(name, error)
"""


@torch.no_grad()
def test_every_mixer_exports_and_loads_through_auto_classes_without_baton(tmp_path):
    """Another process, outside the repository (nothing of Baton importable): AutoModelForCausalLM with
    trust_remote_code gives Baton's logits and greedy tokens, for every causal mixer letter (small_config: every
    option of each mixer; the encoders' LION letters: test_hf_encoder_export.py) and the hybrid of the tied case."""
    models = {letter: LM(small_config(letter * 2)) for letter in MIXER_LETTERS.values()
              if letter != "A" and letter not in ENCODER_LETTERS}
    models["GA-tied"] = build_lm("GA-tied")
    expected = {}
    for name, lm in models.items():
        torch.manual_seed(1)
        for param in lm.parameters():
            param.add_(0.1 * torch.randn_like(param))  # gates, norms and biases away from their init values
        write_export(lm.eval(), tmp_path / name)
        prompt = token_ids()[:, :PROMPT_LEN]
        expected[name] = {"export": str(tmp_path / name), "prompt": prompt.tolist(), "logits": lm(prompt).tolist(),
                          "generated": lm.generate(prompt, NEW_TOKENS, temperature=0).tolist()}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    result = run_without_baton(LOAD_WITHOUT_BATON, tmp_path, str(tmp_path / "expected.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == len(models)
