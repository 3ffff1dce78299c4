"""The delta-rule mixers as configurations of one module (model/gated_deltanet.py): DeltaNet has no decay,
Gated DeltaProduct with one Householder step is Gated DeltaNet, and allow_neg_eigval widens beta to (0, 2)."""
import dataclasses

import pytest
import torch

from model.config import GatedDeltaProductConfig
from tests.model.conftest import small_config

VOCAB = 97  # tests/model/conftest.py's small models


def gates_of(mixer, x: torch.Tensor):
    """The mixer's (g, beta) for the tokens x, from its projections as its forward computes them."""
    t = {"b": mixer.b_proj(x)}
    if mixer.gated:
        t.update(a=mixer.a_proj(x), A_log=mixer.A_log, dt_bias=mixer.dt_bias)
    return mixer._gates(t)


def test_deltanet_has_no_decay(make_lm):
    mixer = make_lm("E").blocks[0].mixer
    names = {name for name, _ in mixer.named_parameters()}
    assert not names & {"A_log", "dt_bias", "a_proj.weight"} and "b_proj.weight" in names
    g, beta = gates_of(mixer, torch.randn(2, 5, 64))
    assert g.shape == (2, 5, 2) and not g.any() and beta.shape == (2, 5, 2)


def test_one_householder_step_is_gated_deltanet(make_lm):
    """Same weights, same outputs (model and decode path): the interleaved form with n_h = 1 is the gated delta rule."""
    settings = dict(num_heads=2, head_dim=16, expand_v=2.0, allow_neg_eigval=True)
    gated = make_lm("D")
    product = make_lm("P", gated_deltaproduct=GatedDeltaProductConfig(num_householder=1, **settings))
    product.load_state_dict(gated.state_dict())
    ids = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(product(ids), gated(ids), atol=1e-5, rtol=1e-4)
        states = [lm.init_state(2, 4) for lm in (gated, product)]
        steps = [lm.step(ids[:, 0], state) for lm, state in zip((gated, product), states)]
    torch.testing.assert_close(steps[1], steps[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern, key", [("D", "gated_deltanet"), ("E", "deltanet"), ("P", "gated_deltaproduct")])
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_allow_neg_eigval_widens_beta_to_two(make_lm, pattern, key, allow_neg_eigval):
    settings = dataclasses.replace(getattr(small_config(pattern), key), allow_neg_eigval=allow_neg_eigval)
    mixer = make_lm(pattern, **{key: settings}).blocks[0].mixer
    with torch.no_grad():
        mixer.b_proj.weight.normal_(0, 0.25)  # logits of a few units: beta near both ends of its range
        _, beta = gates_of(mixer, torch.randn(4, 50, 64))
    assert beta.shape[-1] == 2 and beta.min() > 0
    if allow_neg_eigval:
        assert 1.9 < beta.max() < 2
    else:
        assert 0.9 < beta.max() < 1
