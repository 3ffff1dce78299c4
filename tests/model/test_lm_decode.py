"""Stateful generation: decoding token by token, or a prefill then decoding, gives the teacher-forced logits,
also for a batch of prompts of different lengths; the state is allocated once and written in place."""
import pytest
import torch

from model.config import Mamba2Config

VOCAB = 97  # tests/model/conftest.py's small models

ATOL, RTOL = 1e-5, 1e-4


def test_step_by_step_matches_teacher_forcing(make_lm, pattern):
    lm = make_lm(pattern)
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        expected = lm(ids)
        state = lm.init_state(2, max_len=23)
        logits = [lm.step(ids[:, t], state) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.stack(logits, 1), expected, atol=ATOL, rtol=RTOL)
    assert state.lengths.tolist() == [23, 23]


def test_mamba2_with_negative_eigenvalues_decodes_like_teacher_forcing(make_lm):
    """Mamba2's transition in (-1, 1) (kernels/gla/signed.py): the state's sign flips carry through decode
    steps and a prefill as through the chunked forward."""
    lm = make_lm("M", mamba2=Mamba2Config(expand=2, head_dim=16, d_state=16, n_groups=2, allow_neg_eigval=True))
    with torch.no_grad():
        lm.blocks[0].mixer.A_log.fill_(4.0)  # dt A around -1: transitions 2 exp(dt A) - 1 of both signs
    ids = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        expected = lm(ids)
        state = lm.init_state(2, max_len=70)
        prefill = lm.step(ids[:, :66], state, torch.tensor([66, 66]))
        decoded = [lm.step(ids[:, t], state) for t in range(66, 70)]
    torch.testing.assert_close(prefill, expected[:, :66], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.stack(decoded, 1), expected[:, 66:], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("pattern", ["GMDAW", "RRW", "UL"])
def test_prefill_across_chunks_then_decode(make_lm, pattern):
    """A 67-token prompt spans two kernel chunks; its final states must carry on exactly."""
    lm = make_lm(pattern)
    ids = torch.randint(0, VOCAB, (2, 72))
    with torch.no_grad():
        expected = lm(ids)
        state = lm.init_state(2, max_len=80)
        prefill_logits = lm.step(ids[:, :67], state)
        decoded = [lm.step(ids[:, t], state) for t in range(67, 72)]
    torch.testing.assert_close(prefill_logits, expected[:, :67], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.stack(decoded, 1), expected[:, 67:], atol=ATOL, rtol=RTOL)


def test_prefill_in_chunks_carries_every_cache(make_lm):
    """Prefills continuing a non-empty state (as eval's scoring does): the window ring wraps mid-chunk."""
    lm = make_lm("GMDAW")
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        expected = lm(ids)
        state = lm.init_state(2, max_len=30)
        chunks = [lm.step(ids[:, start:end], state) for start, end in ((0, 3), (3, 11), (11, 29))]
        last = lm.step(ids[:, 29], state)
    torch.testing.assert_close(torch.cat(chunks + [last[:, None]], 1), expected, atol=ATOL, rtol=RTOL)


def test_batched_prompts_of_different_lengths(make_lm, pattern):
    """Right-padded prompts of lengths 9, 4, 4, 13 prefill together, then decode side by side at each row's own
    position: every row's logits are its own sequence's teacher-forced logits (the padding never leaks)."""
    lm = make_lm(pattern)
    lengths = torch.tensor([9, 4, 4, 13])
    ids = torch.randint(0, VOCAB, (4, 13 + 6))
    with torch.no_grad():
        state = lm.init_state(4, max_len=13 + 6)
        prefill_logits = lm.step(ids[:, :13], state, lengths)
        decoded = [lm.step(ids[torch.arange(4), lengths + t], state) for t in range(6)]
        for row, n in enumerate(lengths.tolist()):
            expected = lm(ids[row:row + 1, :n + 6])[0]
            torch.testing.assert_close(prefill_logits[row, :n], expected[:n], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(torch.stack([d[row] for d in decoded]), expected[n:], atol=ATOL, rtol=RTOL)
    assert state.lengths.tolist() == (lengths + 6).tolist()


def test_decode_writes_the_preallocated_state_in_place(make_lm):
    """No tensor of the state is reallocated or resized by a prefill or decode steps; a window layer's cache
    is a ring of `window` slots, a full one max_len slots."""
    lm = make_lm("GMDAW")
    window = lm.config.attention.window
    with torch.no_grad():
        state = lm.init_state(2, max_len=40)
        layout = [{key: (t.data_ptr(), t.shape) for key, t in cache.items() if key != "constants"}
                  for cache in state.caches]
        lm.step(torch.randint(0, VOCAB, (2, 9)), state)
        for _ in range(12):
            lm.step(torch.randint(0, VOCAB, (2,)), state)
    assert [{key: (t.data_ptr(), t.shape) for key, t in cache.items() if key != "constants"}
            for cache in state.caches] == layout
    assert state.caches[3]["k"].shape[1] == 40 and state.caches[4]["k"].shape[1] == window


def test_a_state_that_would_overflow_max_len_is_refused(make_lm):
    lm = make_lm("GA")
    state = lm.init_state(1, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        lm.step(torch.randint(0, VOCAB, (1, 9)), state)


def test_greedy_generate_matches_recomputing_the_whole_sequence(make_lm):
    lm = make_lm("GMDAW")
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = lm.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_with_different_prompt_lengths_equals_one_prompt_at_a_time(make_lm):
    lm = make_lm("GMDAW")
    lengths = torch.tensor([3, 7, 5])
    prompts = torch.randint(0, VOCAB, (3, 7))
    out = lm.generate(prompts, max_new_tokens=5, prompt_lengths=lengths)
    assert out.shape == (3, 12)
    for row, n in enumerate(lengths.tolist()):
        alone = lm.generate(prompts[row:row + 1, :n], max_new_tokens=5)
        assert torch.equal(out[row, :n + 5], alone[0])
        assert not out[row, n + 5:].any()  # the pad after a shorter row's end


def test_stop_tokens_and_max_len_end_rows(make_lm):
    lm = make_lm("GA")
    prompt = torch.randint(0, VOCAB, (2, 4))
    free = lm.generate(prompt, max_new_tokens=8)
    stop = int(free[0, 6])  # row 0's third generated token
    stopped = lm.generate(prompt, max_new_tokens=8, stop_tokens=(stop,))
    first = (free[0, 4:] == stop).nonzero()[0].item() + 4
    assert torch.equal(stopped[0, :first + 1], free[0, :first + 1]) and not stopped[0, first + 1:].any()
    capped = lm.generate(prompt, max_new_tokens=8, max_len=7)  # 3 new tokens fit
    assert torch.equal(capped[:, :7], free[:, :7]) and not capped[:, 7:].any()


def test_sampling_top_p_top_k_and_seed(make_lm):
    lm = make_lm("G")
    prompt = torch.randint(0, VOCAB, (2, 4))
    greedy = lm.generate(prompt, max_new_tokens=5)

    def sampled(seed, **kwargs):
        return lm.generate(prompt, max_new_tokens=5, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                           **kwargs)

    # top_p tiny or top_k 1 keep only the most likely token: sampling becomes greedy.
    assert torch.equal(sampled(0, top_p=1e-6), greedy) and torch.equal(sampled(0, top_k=1), greedy)
    assert torch.equal(sampled(3, top_k=5), sampled(3, top_k=5))  # a seed reproduces
    assert not torch.equal(sampled(3), greedy)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(prompt, max_new_tokens=1, top_p=0.0)
    with pytest.raises(ValueError, match="cuda_graph"):
        lm.generate(prompt, max_new_tokens=1, cuda_graph="always")
