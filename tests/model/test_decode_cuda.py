"""On CUDA, generation replays one decode step captured as a CUDA graph (or compiled with
torch.compile(mode="reduce-overhead")) and gives the same greedy tokens as eager decoding."""
import warnings

import pytest
import torch

from model.generation import CompiledDecodeStep, GraphedDecodeStep

VOCAB = 97  # tests/model/conftest.py's small models
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")]


@pytest.mark.parametrize("mode, step_class", [(True, GraphedDecodeStep), ("compile", CompiledDecodeStep)])
def test_graphed_greedy_generation_equals_eager(make_lm, mode, step_class):
    lm = make_lm("GMDAWX").cuda()
    prompts = torch.randint(0, VOCAB, (3, 40), device="cuda")
    lengths = torch.tensor([40, 17, 29], device="cuda")
    eager = lm.generate(prompts, max_new_tokens=24, prompt_lengths=lengths, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that falls back to eager decoding fails the test
        graphed = lm.generate(prompts, max_new_tokens=24, prompt_lengths=lengths, cuda_graph=mode)
        again = lm.generate(prompts, max_new_tokens=24, prompt_lengths=lengths, cuda_graph=mode)  # replayed
    assert isinstance(lm.__dict__["_decode_step"][1], step_class)
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
