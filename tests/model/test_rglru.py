"""The RG-LRU mixer (model/rglru.py) against the paper's equations written out as a loop over time in fp64, and
its initialisation (a^c uniform in [0.9, 0.999])."""
import torch
import torch.nn.functional as F

from model.config import RGLRUConfig
from model.rglru import A_MAX, A_MIN, GATE_EXPONENT


def paper_rglru(mixer, x: torch.Tensor) -> torch.Tensor:
    """Griffin's recurrent block by its equations, one token at a time, in fp64 (zero initial state)."""
    mixer = mixer.double()
    B, T, _ = x.shape
    H, D = mixer.num_heads, mixer.head_dim
    gate, branch = (x @ mixer.in_proj.weight.T).chunk(2, dim=-1)
    padded = F.pad(branch.transpose(1, 2), (mixer.conv.kernel_size - 1, 0))
    branch = (F.conv1d(padded, mixer.conv.weight[:, None], mixer.conv.bias, groups=mixer.width)).transpose(1, 2)
    blocks = branch.view(B, T, H, D)
    logits = torch.einsum("bthi,hij->bthj", blocks, mixer.gate_weight) + mixer.gate_bias
    input_gate, recurrence_gate = torch.sigmoid(logits).chunk(2, dim=-1)
    a_base = torch.sigmoid(-mixer.Lambda).view(H, D)  # exp(-softplus(Lambda))
    h, outputs = torch.zeros(B, H, D, dtype=x.dtype), []
    for t in range(T):
        a = a_base ** (GATE_EXPONENT * recurrence_gate[:, t])
        h = a * h + torch.sqrt(1 - a ** 2) * (input_gate[:, t] * blocks[:, t])
        outputs.append(h.reshape(B, H * D))
    return mixer.o_proj(F.gelu(gate, approximate="tanh") * torch.stack(outputs, 1))


def test_mixer_follows_the_paper(make_lm):
    lm = make_lm("R", rglru=RGLRUConfig(num_heads=3, width=48))
    mixer = lm.blocks[0].mixer
    with torch.no_grad():
        mixer.gate_bias.normal_()  # a non-trivial bias too
        x = torch.randn(2, 70, lm.config.d_model)
        actual = mixer(x)
        expected = paper_rglru(mixer, x.double())
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6)


def test_lambda_starts_with_a_to_the_c_uniform_in_its_range(make_lm):
    mixer = make_lm("R", rglru=RGLRUConfig(num_heads=2, width=4096)).blocks[0].mixer
    a_to_the_c = torch.exp(-GATE_EXPONENT * F.softplus(mixer.Lambda.detach().double()))
    assert A_MIN <= a_to_the_c.min() and a_to_the_c.max() <= A_MAX
    assert abs(a_to_the_c.mean().item() - (A_MIN + A_MAX) / 2) < 0.005  # uniform: its mean mid-range
    assert a_to_the_c.std().item() > 0.025  # spread over the range (uniform: 0.029), not a point


def test_gates_backward_recomputed_matches_autograd():
    """RGLRUGates' hand-written backward (nothing but the logits kept) == autograd through the plain formulas,
    in fp64, with the sqrt's derivative far from its cap."""
    from model.rglru import RGLRUGates
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    lam = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = [torch.randn(2, 9, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2)]

    def plain():
        input_gate, recurrence_gate = torch.sigmoid(logits + bias).chunk(2, dim=-1)
        a = torch.exp(-GATE_EXPONENT * F.softplus(lam) * recurrence_gate)
        return a, torch.sqrt(1 - a ** 2) * input_gate

    results = []
    for fn in (lambda: RGLRUGates.apply(logits, bias, lam), plain):
        a, scale = fn()
        grads = torch.autograd.grad((a * upstream[0]).sum() + (scale * upstream[1]).sum(), (logits, bias, lam))
        results.append((a, scale, *grads))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-6, atol=1e-9)
