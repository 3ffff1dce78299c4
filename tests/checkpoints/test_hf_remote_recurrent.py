"""The exported Hugging Face code's recurrent mixers (checkpoints/hf/remote/baton_delta_rule.py, baton_rnn.py)
against Baton's own: the delta rule (D, E, P, with and without negative eigenvalues), the RG-LRU (R) and the
ParaRNN cells (U, L, which Baton solves by Newton's method and the export steps token by token).

Each mixer gets Baton's mixer's state_dict unchanged and must give Baton's outputs, and a prompt followed by
single tokens with the carried state must give the whole sequence's outputs. Then the whole exported model
(modeling_baton.py) with Baton's state_dict: Baton's logits, and Baton's greedy generation."""
import dataclasses

import pytest
import torch

from checkpoints.hf.remote.baton_delta_rule import DeltaRuleMixer
from checkpoints.hf.remote.baton_rnn import ParaRNNMixer, RGLRUMixer
from checkpoints.hf.remote.configuration_baton import BatonConfig
from checkpoints.hf.remote.modeling_baton import BatonForCausalLM
from model import LM

VOCAB = 97
SEQ_LEN, PROMPT_LEN = 37, 20
TOLERANCE = 1e-5
DELTA_RULE = dict(num_heads=2, head_dim=16, expand_v=2.0)
# id: (letter, the mixer's settings). Small, and every option of each mixer at least once.
CASES = {
    "D": ("D", dict(gated_deltanet=DELTA_RULE)),
    "D-neg-eigval": ("D", dict(gated_deltanet=dict(DELTA_RULE, allow_neg_eigval=True))),
    "E": ("E", dict(deltanet=dict(DELTA_RULE, expand_v=1.0))),
    "E-neg-eigval-ungated": ("E", dict(deltanet=dict(DELTA_RULE, allow_neg_eigval=True, use_output_gate=False))),
    "P": ("P", dict(gated_deltaproduct=dict(DELTA_RULE, expand_v=1.5, num_householder=3, allow_neg_eigval=True,
                                            use_output_gate=False))),
    "R": ("R", dict(rglru=dict(num_heads=2, width=48))),
    "U": ("U", dict(pararnn=dict(num_heads=2, width=32))),
    "L": ("L", dict(pararnn=dict(num_heads=2, width=32))),
    "L-hc": ("L", dict(pararnn=dict(num_heads=2, width=32, lstm="hc"))),
    "L-cifg": ("L", dict(pararnn=dict(num_heads=2, width=32, lstm="cifg"))),
}
EXPORTED = {"D": DeltaRuleMixer, "E": DeltaRuleMixer, "P": DeltaRuleMixer, "R": RGLRUMixer, "U": ParaRNNMixer,
            "L": ParaRNNMixer}


def build_lm(case: str, seed: int = 0, layers: int = 1) -> LM:
    """An fp32 model of `layers` blocks of the case's mixer, every parameter its init plus N(0, 0.1) noise: gate
    biases, norm weights and the like away from their special init values, projections large enough that the
    outputs are of order one."""
    letter, settings = CASES[case]
    torch.manual_seed(seed)
    lm = LM.from_config(dict(vocab_size=VOCAB, d_model=64, d_ff=128, pattern=letter * layers, tie_embeddings=False,
                             **settings)).eval()
    with torch.no_grad():
        for param in lm.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return lm


def exported_mixer(lm: LM, case: str) -> torch.nn.Module:
    letter = CASES[case][0]
    mixer = EXPORTED[letter](BatonConfig(baton=dataclasses.asdict(lm.config)), letter)
    mixer.load_state_dict(lm.blocks[0].mixer.state_dict())
    return mixer.eval()


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_mixer_matches_baton(case):
    lm = build_lm(case)
    mixer = exported_mixer(lm, case)
    x = torch.randn(2, SEQ_LEN, 64, generator=torch.Generator().manual_seed(1))
    expected = lm.blocks[0].mixer(x)
    whole, _ = mixer(x, None)
    assert expected.abs().amax() > 0.1  # outputs of order one: the tolerance means something
    assert (whole - expected).abs().amax() <= TOLERANCE

    # A prompt, then one token at a time with the carried state.
    pieces, state = [], None
    for chunk in (x[:, :PROMPT_LEN], *x[:, PROMPT_LEN:].split(1, dim=1)):
        y, state = mixer(chunk, state)
        pieces.append(y)
    assert (torch.cat(pieces, 1) - whole).abs().amax() <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_model_matches_baton(case):
    """Two blocks (a state per layer): the exported model's logits and greedy continuation are Baton's."""
    lm = build_lm(case, layers=2)
    model = BatonForCausalLM(BatonConfig(baton=dataclasses.asdict(lm.config)))
    model.load_state_dict(lm.state_dict())
    model.eval()
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    expected = lm(ids)
    assert (model(ids).logits - expected).abs().amax() <= TOLERANCE

    prompt = ids[:, :PROMPT_LEN]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, lm.generate(prompt, 8, temperature=0))
