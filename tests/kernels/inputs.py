"""Inputs of the kernel tests: fp64 leaves and upstream gradients of each op, the packed-document layout,
and the Triton entry points (imported on first use: the interpreter switch must come first, conftest.py)."""
import torch
import torch.nn.functional as F

# Uneven documents, none aligned with the 64-token chunks: one shorter than a 16-token sub-chunk, an empty
# one (its final state is its initial state), a single token, one over three chunks (the last of one token) and
# a short one after it; as few tokens as that takes, since the interpreter runs every chunk's program in turn.
CU_SEQLENS = torch.tensor([0, 7, 70, 70, 71, 200, 213], dtype=torch.int32)
NUM_DOCS = len(CU_SEQLENS) - 1
PACKED_T = int(CU_SEQLENS[-1])  # the tokens of a packed row
# Row lengths of the Triton tests: one token, one whole chunk, and two chunks the second ragged (down to a
# partial 16-token sub-chunk). On a GPU also a partial sub-chunk alone and five chunks; in the interpreter the
# packed rows above cover a row of three chunks.
TRITON_LENGTHS = [1, 15, 64, 100, 257] if torch.cuda.is_available() else [1, 64, 100]


def gla_inputs(B, T, H, K, V, scalar_gate, num_states, gates="normal", seed=0):
    """fp64 inputs (leaf tensors) and upstream gradients; gates: 'normal', 'strong', 'extreme' or 'mixed'."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    gate_shape = (B, T, H) if scalar_gate else (B, T, H, K)
    if gates == "normal":
        g = F.logsigmoid(rand(*gate_shape) + 2)  # around -0.1: long memory
    elif gates == "strong":  # a chunk decays by up to e^-58: the edge of the factorised intra-chunk path
        g = -0.9 * torch.rand(*gate_shape, generator=gen, dtype=torch.float64).clamp_min(0.99)
    elif gates == "extreme":  # a_t = exp(g) between e^-40 and e^-20: nothing may overflow or vanish to NaN
        g = -20 - 20 * torch.rand(*gate_shape, generator=gen, dtype=torch.float64)
    else:  # 'mixed': gates near one (g ~ -1e-6) next to gates of e^-100
        near_one = -1e-6 * torch.rand(*gate_shape, generator=gen, dtype=torch.float64)
        g = torch.where(torch.rand(*gate_shape, generator=gen) < 0.8, near_one, -100.0)
    inputs = dict(q=rand(B, T, H, K), k=rand(B, T, H, K) / K ** 0.5, v=rand(B, T, H, V), g=g,
                  initial_state=rand(num_states, H, K, V))
    upstream = dict(o=rand(B, T, H, V), final_state=rand(num_states, H, K, V))
    return inputs, upstream


def gated_delta_rule_inputs(B, T, H, K, V, num_states, gates="normal", seed=0):
    """fp64 leaf inputs and upstream gradients. gates: 'normal'; 'extreme' (g in [-40, -20]); 'mixed'
    (g ~ -1e-6, a gate of almost exactly one, next to g = -100); 'aligned' (normal gates, but nearly parallel
    keys and beta near 2: the WY system (I + A) is as far from the identity as it gets); 'none' (g = 0:
    DeltaNet, the delta rule without a decay: nothing fades, every step's rounding stays in the state)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    uniform = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, beta = rand(B, T, H, K), rand(B, T, H, K), 2 * uniform(B, T, H)
    if gates == "extreme":
        g = -20 - 20 * uniform(B, T, H)
    elif gates == "mixed":
        g = torch.where(uniform(B, T, H) < 0.8, -1e-6 * uniform(B, T, H), -100.0)
    elif gates == "none":
        g = torch.zeros(B, T, H, dtype=torch.float64)
    else:
        g = F.logsigmoid(rand(B, T, H) + 2)
    if gates == "aligned":
        k = rand(1, 1, H, K) + 0.05 * k
        beta = 1.9 + 0.1 * beta / 2
    inputs = dict(q=F.normalize(q, dim=-1), k=F.normalize(k, dim=-1), v=rand(B, T, H, V), g=g, beta=beta,
                  initial_state=rand(num_states, H, K, V))
    upstream = dict(o=rand(B, T, H, V), final_state=rand(num_states, H, K, V))
    return inputs, upstream


def conv_inputs(B, T, D, W, N, bias=True, state=True, seed=0):
    """fp64 inputs of the short convolution (x [B, T, D], weight [D, W], bias, state [N, D, W-1]) and upstream
    gradients of its output and final state."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    inputs = dict(x=rand(B, T, D), weight=rand(D, W), bias=rand(D) if bias else None,
                  initial_state=rand(N, D, W - 1) if state else None)
    return inputs, dict(y=rand(B, T, D), final_state=rand(N, D, W - 1))


def run_conv(fn, inputs, upstream, cu_seqlens=None, activation="silu", dtype=torch.float64):
    """Output, final state and the gradients of every input, in fp64; the final state gets a gradient too."""
    leaves = {n: x.detach().to(dtype).requires_grad_() for n, x in inputs.items() if x is not None}
    y, final = fn(leaves["x"], leaves["weight"], leaves.get("bias"), activation, leaves.get("initial_state"),
                  output_final_state=True, cu_seqlens=cu_seqlens)
    ((y.double() * upstream["y"]).sum() + (final.double() * upstream["final_state"]).sum()).backward()
    results = {"y": y, "final_state": final, **{f"d{n}": x.grad for n, x in leaves.items()}}
    return {name: t.detach().double() for name, t in results.items()}


def gla_triton_chunk(*args, **kwargs):
    from kernels.gla.triton_chunk import chunk_gla_triton
    return chunk_gla_triton(*args, **kwargs)


def gla_triton_fused_recurrent(*args, **kwargs):
    from kernels.gla.fused_recurrent import fused_recurrent_gla_triton
    return fused_recurrent_gla_triton(*args, **kwargs)


def gated_delta_rule_triton_chunk(*args, **kwargs):
    from kernels.gated_delta_rule.triton_chunk import chunk_gated_delta_rule_triton
    return chunk_gated_delta_rule_triton(*args, **kwargs)


def gated_delta_rule_triton_fused_recurrent(*args, **kwargs):
    from kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_triton
    return fused_recurrent_gated_delta_rule_triton(*args, **kwargs)


def diagonal_scan_inputs(B, T, H, D, num_states, gates="signed", seed=0):
    """fp64 inputs (a, b [B, T, H, D], initial state [N, H, D]) of the diagonal scan and upstream gradients.
    gates: 'signed' (a uniform in (-1, 1)); 'long' (|a| in (0.97, 1), either sign: long memory that flips);
    'mixed' (exact zeros, which cut the state, next to |a| up to 1.05, which grows it, and tiny a ~ 1e-30)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    uniform = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    shape = (B, T, H, D)
    sign = torch.where(uniform(*shape) < 0.5, -1.0, 1.0)
    if gates == "signed":
        a = 2 * uniform(*shape) - 1
    elif gates == "long":
        a = sign * (0.97 + 0.03 * uniform(*shape))
    else:
        choice = uniform(*shape)
        moderate = sign * (0.9 + 0.15 * uniform(*shape))
        a = torch.where(choice < 0.05, 0.0, torch.where(choice < 0.1, sign * 1e-30, moderate))
    inputs = dict(a=a, b=rand(*shape), initial_state=rand(num_states, H, D))
    return inputs, dict(h=rand(*shape), final_state=rand(num_states, H, D))


def run_scan(fn, inputs, upstream, dtype, device="cpu", cu_seqlens=None):
    """h, final state and the gradients of a, b and the initial state (fp64 on the CPU); the final state gets an
    upstream gradient too."""
    leaves = {n: x.detach().to(device, dtype).requires_grad_() for n, x in inputs.items() if x is not None}
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device)
    h, final = fn(leaves["a"], leaves["b"], leaves.get("initial_state"), output_final_state=True,
                  cu_seqlens=cu_seqlens)
    loss = (h.double() * upstream["h"].to(device)).sum() + (final.double() * upstream["final_state"].to(device)).sum()
    loss.backward()
    results = {"h": h, "final_state": final, **{f"d{n}": x.grad for n, x in leaves.items()}}
    return {name: t.detach().double().cpu() for name, t in results.items()}


def diagonal_scan_triton_chunk(*args, **kwargs):
    from kernels.diagonal_scan.triton_scan import chunk_diagonal_scan_triton
    return chunk_diagonal_scan_triton(*args, **kwargs)


def diagonal_scan_triton_fused_recurrent(*args, **kwargs):
    from kernels.diagonal_scan.fused_recurrent import fused_recurrent_diagonal_scan_triton
    return fused_recurrent_diagonal_scan_triton(*args, **kwargs)


def block_diagonal_scan_inputs(B, T, H, D, num_states, gates="signed", seed=0):
    """fp64 inputs (a [B, T, H, D, 2, 2], b [B, T, H, D, 2], initial state [N, H, D, 2]) of the block-diagonal scan
    and upstream gradients. gates: 'signed' (entries uniform in (-0.7, 0.7)); 'long' (a rotation, or a reflection,
    scaled by 0.97 to 1: long memory that turns and flips); 'mixed' (zero blocks, which cut the state, rank-one
    blocks, tiny ones ~ 1e-30, next to rotations scaled up to 1.05, which grow it, and triangular blocks as
    the LSTM's Jacobian has)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    uniform = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    shape = (B, T, H, D)
    angle = 2 * torch.pi * uniform(*shape)
    cos, sin = torch.cos(angle), torch.sin(angle)
    flip = torch.where(uniform(*shape) < 0.5, -1.0, 1.0)  # a reflection: det -1
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([flip * sin, flip * cos], -1)], -2)
    if gates == "signed":
        a = 1.4 * uniform(*shape, 2, 2) - 0.7
    elif gates == "long":
        a = (0.97 + 0.03 * uniform(*shape))[..., None, None] * rotation
    else:
        choice = uniform(*shape)[..., None, None]
        grows = (0.9 + 0.15 * uniform(*shape))[..., None, None] * rotation
        rank_one = rand(*shape, 2, 1) * rand(*shape, 1, 2) / 2
        triangular = (1.4 * uniform(*shape, 2, 2) - 0.7) * torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
        a = torch.where(choice < 0.05, 0.0, torch.where(choice < 0.1, 1e-30 * rotation, torch.where(
            choice < 0.2, rank_one, torch.where(choice < 0.4, triangular, grows))))
    inputs = dict(a=a, b=rand(*shape, 2), initial_state=rand(num_states, H, D, 2))
    return inputs, dict(h=rand(*shape, 2), final_state=rand(num_states, H, D, 2))


def block_diagonal_scan_triton_chunk(*args, **kwargs):
    from kernels.block_diagonal_scan.triton_scan import chunk_block_diagonal_scan_triton
    return chunk_block_diagonal_scan_triton(*args, **kwargs)


def block_diagonal_scan_triton_fused_recurrent(*args, **kwargs):
    from kernels.block_diagonal_scan.fused_recurrent import fused_recurrent_block_diagonal_scan_triton
    return fused_recurrent_block_diagonal_scan_triton(*args, **kwargs)


def mlstm_inputs(B, T, H, K, V, num_states, input_gates=3.0, seed=0):
    """fp64 leaves and upstream gradients; input gate logs ~ N(0, input_gates^2), forget gates ~ 0.9."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    state = rand(num_states, H, K, V + 2)
    state[..., -1] = 2 * rand(num_states, H, 1)  # the stabiliser: one per head, in every row
    inputs = dict(q=rand(B, T, H, K), k=rand(B, T, H, K), v=rand(B, T, H, V), i=input_gates * rand(B, T, H),
                  f=F.logsigmoid(rand(B, T, H) + 2), initial_state=state)
    upstream = dict(o=rand(B, T, H, V), final_state=rand(num_states, H, K, V + 2))
    return inputs, upstream
