"""Liger (model/liger.py, letter Z) and LoRA (model/lora.py): a linearized model has exactly the teacher's parameters
plus LoRA's; its gate is a function of the keys alone; it decodes (recurrent state + window ring) as the
teacher-forced forward computes, past the window, and packs documents; in teacher mode it is the Transformer; LoRA
merged equals LoRA unmerged; the distillation loss is cross entropy + w KL with the right gradients."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from configs.errors import ConfigError
from model import LM
from model.config import AttentionConfig, LigerConfig, LoRAConfig, RopeScalingConfig
from model.decode_ops import count_decode_ops
from model.liger import Liger, linearized_pattern, teacher_mode
from model.lora import LoRALinear, is_lora_parameter, merge_lora
from model.loss import linear_cross_entropy, linear_distillation_loss
from tests.model.conftest import small_config

VOCAB = 97
ATOL, RTOL = 1e-5, 1e-4
WINDOW = 5  # shorter than every test sequence: the window branch's ring wraps
# Every option a linearized model can carry from its teacher: GQA, biases on every projection, Qwen3's q/k norms,
# Llama 3's rope scaling.
IMPORTED = AttentionConfig(num_heads=4, num_kv_heads=2, qkv_bias=True, out_bias=True, qk_norm=True, rope_theta=500.0,
                           rope_scaling=RopeScalingConfig(factor=8.0, original_max_position_embeddings=16))
CASES = {"gla": dict(), "scalar": dict(gate="scalar"), "gla-imported": dict(attention=IMPORTED),
         "mix-0.8": dict(mix=0.8)}


def liger_lm(pattern: str = "ZAZ", seed: int = 0, lora: int = 0, noise: float = 0.1, case: str = "gla") -> LM:
    """A small fp32 Liger model whose every parameter (LoRA's B included) is off its init, so every branch, bias,
    norm and LoRA update shows in the outputs."""
    settings = dict(CASES[case])
    attention = settings.pop("attention", small_config("A").attention)
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    lm = LM(small_config(pattern, attention=attention, liger=LigerConfig(window=WINDOW, **settings),
                         lora=LoRAConfig(rank=lora, targets=targets))).eval()
    with torch.no_grad():
        for param in lm.parameters():
            param.add_(noise * torch.randn_like(param))
    return lm


def teacher_of(lm: LM) -> LM:
    """The Transformer whose weights lm carries: its pattern with attention for Liger, no LoRA."""
    config = dataclasses.replace(lm.config, pattern=lm.config.pattern.replace("Z", "A"), lora=LoRAConfig())
    teacher = LM(config).eval()
    teacher.load_state_dict({k: v for k, v in lm.state_dict().items() if not is_lora_parameter(k)})
    return teacher


def test_a_liger_layer_has_the_attention_layers_parameters_and_lora_only_adds_its_own():
    teacher = liger_lm("AAA", case="gla-imported")
    for rank in (0, 8):
        lm = liger_lm("ZAZ", lora=rank, case="gla-imported")
        shapes = {name: tuple(p.shape) for name, p in lm.named_parameters() if not is_lora_parameter(name)}
        assert shapes == {name: tuple(p.shape) for name, p in teacher.named_parameters()}
        # LoRA on q, k, v, o of 3 attention-family layers and 3 MLPs' up_proj: rank x (in + out) each
        a = lm.config.attention
        q, kv = a.num_heads * 16, a.num_kv_heads * 16
        lora = rank * 3 * ((64 + q) + 2 * (64 + kv) + (q + 64) + (64 + 128))
        assert lm.num_params() == teacher.num_params() + lora
        assert sum(p.numel() for p in lm.parameters() if p.requires_grad) == (lora or teacher.num_params())


def test_the_pattern_linearizes_attention_and_liger_h_keeps_every_nth():
    assert linearized_pattern(list("AAAAAAAA"), None) == "ZZZZZZZZ"
    assert linearized_pattern(list("AAAAAAAAAAAAAAAA"), 8) == "ZZZZZZZAZZZZZZZA"  # one A after every 7 Liger layers
    assert linearized_pattern(list("AWAGAA"), 2) == "ZWZGZA"  # only full attention is linearized


class RecordingCore:
    """The layer's recurrent core, recording each gate it is given."""

    def __init__(self, core):
        self.core, self.gates = core, []

    def chunk(self, q, k, v, g, **kwargs):
        self.gates.append(g.detach().clone())
        return self.core.chunk(q, k, v, g, **kwargs)


@pytest.mark.parametrize("gate", ["gla", "scalar"])
def test_the_gate_is_a_function_of_the_keys_alone(gate):
    lm = liger_lm("Z", case=gate)
    layer = lm.blocks[0].mixer
    recorder = layer.core = RecordingCore(layer.core)
    x = torch.randn(2, 11, 64)

    def gate_now() -> torch.Tensor:
        with torch.no_grad():
            layer(x)
        return recorder.gates[-1]

    first = gate_now()
    with torch.no_grad():  # other queries and values, the same keys: the same gate
        for proj in (layer.q_proj, layer.v_proj, layer.o_proj):
            proj.weight.add_(torch.randn_like(proj.weight))
    torch.testing.assert_close(gate_now(), first, rtol=0, atol=0)
    with torch.no_grad():
        k = layer.k_norm(layer.k_proj(x).view(2, 11, 2, 16)) if layer.k_norm else layer.k_proj(x).view(2, 11, 2, 16)
    expected = F.logsigmoid(k) if gate == "gla" else -F.softplus(k.mean(-1))
    torch.testing.assert_close(first, (expected / 16).repeat_interleave(2, dim=2))  # each KV head's to its 2 queries
    assert first.shape == ((2, 11, 4, 16) if gate == "gla" else (2, 11, 4)) and (first < 0).all()
    with torch.no_grad():  # other keys: another gate
        layer.k_proj.weight.add_(torch.randn_like(layer.k_proj.weight))
    assert not torch.allclose(gate_now(), first)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("lora", [0, 4])
def test_decoding_past_the_window_matches_teacher_forcing(case, lora):
    """A prefill across two kernel chunks, then single tokens; and token by token from the start: both give the
    teacher-forced logits at every position (70 > WINDOW: the ring wraps many times)."""
    lm = liger_lm("ZAZ", lora=lora, case=case)
    ids = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        expected = lm(ids)
        assert expected.abs().amax() > 1
        state = lm.init_state(2, max_len=80)
        prefill = lm.step(ids[:, :66], state)
        decoded = [lm.step(ids[:, t], state) for t in range(66, 70)]
        torch.testing.assert_close(prefill, expected[:, :66], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(torch.stack(decoded, 1), expected[:, 66:], atol=ATOL, rtol=RTOL)
        state = lm.init_state(2, max_len=70)
        stepped = torch.stack([lm.step(ids[:, t], state) for t in range(70)], 1)
    torch.testing.assert_close(stepped, expected, atol=ATOL, rtol=RTOL)


def test_prompts_of_different_lengths_decode_side_by_side():
    lm = liger_lm("ZZ")
    lengths = torch.tensor([9, 4, 13])
    ids = torch.randint(0, VOCAB, (3, 13 + 6))
    with torch.no_grad():
        state = lm.init_state(3, max_len=13 + 6)
        prefill = lm.step(ids[:, :13], state, lengths)
        decoded = [lm.step(ids[torch.arange(3), lengths + t], state) for t in range(6)]
        for row, n in enumerate(lengths.tolist()):
            expected = lm(ids[row:row + 1, :n + 6])[0]
            torch.testing.assert_close(prefill[row, :n], expected[:n], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(torch.stack([d[row] for d in decoded]), expected[n:], atol=ATOL, rtol=RTOL)


def test_the_decode_state_does_not_grow_with_the_context_and_a_step_is_constant_work():
    """The Liger layer's state: the window's ring and the recurrent state, whatever max_len; the teacher's KV cache
    grows with it. A decode step's operations are the same at context 256 and 2048, with no host sync."""
    lm = liger_lm("ZZ")
    sizes = {max_len: lm.init_state(1, max_len).numel() for max_len in (256, 4096)}
    assert sizes[256] == sizes[4096] == 2 * (2 * WINDOW * 2 * 16 + 4 * 16 * 16)
    teacher = teacher_of(lm)
    assert teacher.init_state(1, 4096).numel() == 16 * teacher.init_state(1, 256).numel()
    counts = {}
    for context in (256, 2048):
        state = lm.init_state(2, 2048 + 8)
        with torch.no_grad():
            lm.step(torch.randint(0, VOCAB, (2, context)), state)
        counts[context] = count_decode_ops(lm, torch.randint(0, VOCAB, (2,)), state)
    assert counts[256] == counts[2048]
    assert all(block["host_syncs"] == 0 for block in counts[2048]["blocks"])


def test_packed_documents_are_independent():
    lm = liger_lm("ZAZ")
    docs = [torch.randint(0, VOCAB, (1, n)) for n in (7, 30, 11)]
    cu_seqlens = torch.tensor([0, 7, 37, 48], dtype=torch.int32)
    with torch.no_grad():
        packed = lm(torch.cat(docs, 1), cu_seqlens=cu_seqlens)
        alone = torch.cat([lm(doc) for doc in docs], 1)
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["gla", "gla-imported"])
def test_teacher_mode_is_the_transformer_whose_weights_it_carries(case):
    lm = liger_lm("ZAZ", lora=4, case=case)
    teacher = teacher_of(lm)
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        expected = teacher(ids)
        with teacher_mode(lm):
            torch.testing.assert_close(lm(ids), expected, atol=0, rtol=0)
        assert (lm(ids) - expected).abs().amax() > 0.1  # out of teacher mode: Liger layers and LoRA on
    assert not any(m.teacher for m in lm.modules() if isinstance(m, (Liger, LoRALinear)))


def test_fresh_lora_computes_the_base_weights():
    lm = liger_lm("ZA", lora=4, noise=0.0)
    plain = LM(dataclasses.replace(lm.config, lora=LoRAConfig())).eval()
    plain.load_state_dict({k: v for k, v in lm.state_dict().items() if not is_lora_parameter(k)})
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), plain(ids), atol=0, rtol=0)  # B = 0 at init


@pytest.mark.parametrize("pattern", ["ZAZ", "AW"])
def test_lora_merged_equals_unmerged(pattern):
    lm = liger_lm(pattern, lora=4)
    merged = merge_lora(lm)
    assert merged.config.lora.rank == 0 and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert merged.num_params() == lm.num_params() - sum(p.numel() for n, p in lm.named_parameters()
                                                        if is_lora_parameter(n))
    assert all(p.requires_grad for p in merged.parameters())
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        expected = lm(ids)
        torch.testing.assert_close(merged(ids), expected, atol=ATOL, rtol=RTOL)
        assert (teacher_of(lm)(ids) - expected).abs().amax() > 0.1  # the updates mattered
    assert merge_lora(merged) is merged


def test_a_training_step_moves_only_lora():
    from configs.schema import OptimConfig
    from training.optim import build_optimizer

    lm = liger_lm("ZA", lora=4).train()
    before = {name: p.detach().clone() for name, p in lm.named_parameters()}
    optimizer = build_optimizer(lm, OptimConfig(lr=1e-2))
    ids = torch.randint(0, VOCAB, (2, 21))
    lm(ids[:, :-1], labels=ids[:, 1:]).backward()
    optimizer.step()
    for name, param in lm.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == is_lora_parameter(name), name


@pytest.mark.parametrize("valid_vocab", [None, 90])
def test_the_distillation_loss_is_cross_entropy_plus_kl_with_its_gradients(valid_vocab):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    teacher = torch.randn(3, 7, 16)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    targets = torch.randint(0, valid_vocab or VOCAB, (3, 7))
    targets[0, :3] = -100
    loss = linear_distillation_loss(hidden, teacher, weight, targets, 0.7, valid_vocab_size=valid_vocab)
    loss.backward()
    hidden2, weight2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    vocab = valid_vocab or VOCAB
    log_p = (hidden2 @ weight2[:vocab].T).log_softmax(-1)
    log_t = (teacher @ weight2[:vocab].T).detach().log_softmax(-1)
    keep = targets != -100
    kl = (log_t.exp() * (log_t - log_p)).sum(-1)
    expected = linear_cross_entropy(hidden2, weight2, targets, valid_vocab_size=valid_vocab) + 0.7 * kl[keep].mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, hidden2.grad)
    torch.testing.assert_close(weight.grad, weight2.grad)
    zero = linear_distillation_loss(hidden, hidden.detach(), weight, targets, 5.0, valid_vocab_size=valid_vocab)
    torch.testing.assert_close(zero, linear_cross_entropy(hidden, weight, targets, valid_vocab_size=valid_vocab))


def test_distillation_through_the_model_against_its_teacher():
    lm = liger_lm("ZA", lora=4).train()
    ids = torch.randint(0, VOCAB, (2, 21))
    loss = lm(ids[:, :-1], labels=ids[:, 1:], distill=0.5)
    with torch.no_grad():
        with teacher_mode(lm):
            log_t = lm(ids[:, :-1]).log_softmax(-1)
        log_p = lm(ids[:, :-1]).log_softmax(-1)
        ce = F.cross_entropy(log_p.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss.detach(), ce + 0.5 * (log_t.exp() * (log_t - log_p)).sum(-1).mean())
    loss.backward()
    assert all((p.grad is not None) == is_lora_parameter(n) for n, p in lm.named_parameters())
    with pytest.raises(ValueError, match="LoRA"):
        liger_lm("ZA")(ids[:, :-1], labels=ids[:, 1:], distill=0.5)


def test_bad_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="model.liger.gate: 'none'"):
        small_config("Z", liger=LigerConfig(gate="none"))
    with pytest.raises(ConfigError, match="model.liger: need window >= 1"):
        small_config("Z", liger=LigerConfig(mix=1.5))
    with pytest.raises(ConfigError, match="model.lora.targets: \\['down_proj'\\]"):
        small_config("Z", lora=LoRAConfig(rank=4, targets=["down_proj"]))
    with pytest.raises(ConfigError, match="o_proj names no projection"):
        LM(small_config("G", lora=LoRAConfig(rank=4, targets=["o_proj"])))  # a GLA layer's o_proj bypasses LoRA
    with pytest.raises(ConfigError, match="num_kv_heads"):
        LM(small_config("Z", attention=AttentionConfig(num_heads=4, num_kv_heads=3)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels, FlexAttention and CUDA graphs need CUDA")
def test_on_cuda_the_kernels_match_the_cpu_path_and_graphed_decoding_equals_eager():
    """Liger on CUDA (Triton chunk_gla and fused recurrent steps, FlexAttention's window): the CPU path's logits and
    gradients; one decode step captured as a CUDA graph gives eager decoding's greedy tokens."""
    import warnings

    from model.generation import GraphedDecodeStep

    lm = liger_lm("ZAZ", lora=4).train()
    ids = torch.randint(0, VOCAB, (2, 130))
    lm(ids[:, :-1], labels=ids[:, 1:], distill=0.5).backward()
    expected = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = lm.eval()(ids)
    lm.zero_grad()
    lm = lm.cuda().train()
    cuda_ids = ids.cuda()
    lm(cuda_ids[:, :-1], labels=cuda_ids[:, 1:], distill=0.5).backward()
    for name, grad in expected.items():
        torch.testing.assert_close(lm.get_parameter(name).grad.cpu(), grad, atol=2e-3, rtol=2e-2, msg=name)
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(cuda_ids).cpu(), logits, atol=2e-3, rtol=2e-2)
    prompts = torch.randint(0, VOCAB, (3, 40), device="cuda")
    lengths = torch.tensor([40, 17, 29], device="cuda")
    eager = lm.generate(prompts, max_new_tokens=24, prompt_lengths=lengths, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that falls back to eager decoding fails the test
        graphed = lm.generate(prompts, max_new_tokens=24, prompt_lengths=lengths, cuda_graph=True)
    assert isinstance(lm.__dict__["_decode_step"][1], GraphedDecodeStep)
    assert torch.equal(graphed, eager)
