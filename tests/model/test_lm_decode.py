"""Stateful generation: decoding token by token, or a prefill then decoding, gives the teacher-forced logits."""
import pytest
import torch

VOCAB = 97  # tests/model/conftest.py's small models

ATOL, RTOL = 1e-5, 1e-4


def test_step_by_step_matches_teacher_forcing(make_lm, pattern):
    lm = make_lm(pattern)
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        expected = lm(ids)
        state, logits = lm.init_state(2), []
        for t in range(ids.shape[1]):
            step_logits, state = lm.step(ids[:, t], state)
            logits.append(step_logits)
    torch.testing.assert_close(torch.stack(logits, 1), expected, atol=ATOL, rtol=RTOL)


def test_prefill_across_chunks_then_decode(make_lm):
    """A 67-token prompt spans two kernel chunks; its final states must carry on exactly."""
    lm = make_lm("GMDAW")
    ids = torch.randint(0, VOCAB, (2, 72))
    with torch.no_grad():
        expected = lm(ids)
        prefill_logits, state = lm.step(ids[:, :67], lm.init_state(2))
        decoded = []
        for t in range(67, 72):
            step_logits, state = lm.step(ids[:, t], state)
            decoded.append(step_logits)
    torch.testing.assert_close(prefill_logits, expected[:, :67], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.stack(decoded, 1), expected[:, 67:], atol=ATOL, rtol=RTOL)


def test_step_leaves_the_given_state_untouched(make_lm):
    lm = make_lm("GMDAW")
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        _, state = lm.step(ids, lm.init_state(1))
        first, _ = lm.step(ids[:, 0], state)
        again, _ = lm.step(ids[:, 0], state)
    torch.testing.assert_close(first, again, atol=0, rtol=0)


def test_sliding_window_cache_keeps_only_the_window(make_lm):
    lm = make_lm("W")
    window = lm.config.attention.window
    with torch.no_grad():
        _, state = lm.step(torch.randint(0, VOCAB, (2, 9)), lm.init_state(2))
        assert state[0]["k"].shape[1] == window
        for _ in range(3):
            _, state = lm.step(torch.randint(0, VOCAB, (2,)), state)
    assert state[0]["k"].shape[1] == window
    assert state[0]["key_pos"].tolist() == list(range(12 - window, 12))


def test_recurrent_state_is_constant_size(make_lm):
    lm = make_lm("GMD")
    with torch.no_grad():
        _, state = lm.step(torch.randint(0, VOCAB, (1, 3)), lm.init_state(1))
        sizes = [sum(t.numel() for t in layer.values()) for layer in state]
        for _ in range(4):
            _, state = lm.step(torch.randint(0, VOCAB, (1,)), state)
    assert [sum(t.numel() for t in layer.values()) for layer in state] == sizes


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


def test_sampling_respects_top_p(make_lm):
    lm = make_lm("G")
    prompt = torch.randint(0, VOCAB, (1, 4))
    generator = torch.Generator().manual_seed(0)
    # top_p tiny keeps only the most likely token: sampling becomes greedy.
    sampled = lm.generate(prompt, max_new_tokens=5, temperature=1.0, top_p=1e-6, generator=generator)
    assert torch.equal(sampled, lm.generate(prompt, max_new_tokens=5))
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(prompt, max_new_tokens=1, top_p=0.0)
