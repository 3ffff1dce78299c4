"""The Triton kernels are right under any autotune candidate and any number of launches.

The autotuner launches each candidate config many times on the real arguments before the launch that counts,
so a kernel that reads and rewrites a buffer it is given (out += ...) returns a sum over those launches on the
first call at each new tuning key. And any candidate may win on some GPU, so every one must be right, not just
the first (the only one the interpreter would otherwise run). Both are checked here on every kernel the ops
launch, forward and backward, with packed documents of odd lengths and initial/final states: under
TRITON_INTERPRET=1 on CPU, compiled on a GPU.
"""
import contextlib

import pytest
import torch

from compare import assert_matches, run
from inputs import (block_diagonal_scan_inputs, block_diagonal_scan_triton_chunk,
                    block_diagonal_scan_triton_fused_recurrent, conv_inputs, diagonal_scan_inputs, diagonal_scan_triton_chunk,
                    diagonal_scan_triton_fused_recurrent, gated_delta_rule_inputs, gated_delta_rule_triton_chunk,
                    gated_delta_rule_triton_fused_recurrent, gla_inputs, gla_triton_chunk, gla_triton_fused_recurrent,
                    mlstm_inputs, run_conv, run_scan)
from kernels import causal_conv1d, rms_norm, rotate_rows
from kernels.conv.naive import naive_causal_conv1d
from kernels.block_diagonal_scan.naive import naive_block_diagonal_scan
from kernels.diagonal_scan.naive import naive_diagonal_scan
from kernels.norm import naive_rms_norm
from kernels.rotary import naive_rotate_rows
from kernels.backend import interpret_mode
from kernels.gated_delta_rule.naive import naive_gated_delta_rule
from kernels.gla.naive import naive_recurrent_gla
from kernels.mlstm import chunk_mlstm, fused_recurrent_mlstm, naive_recurrent_mlstm
from kernels.tuning import AUTOTUNERS, pinned_config

# compiled on a GPU (bench.gpu_check), interpreted here; every candidate of every kernel is an exhaustive sweep,
# left out of `make test-fast`
pytestmark = [pytest.mark.gpu, pytest.mark.slow]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 5e-3 if DEVICE == "cuda" else 2e-4  # GLA's fp32 dots are TF32 on a GPU

# Documents of odd lengths (none aligned with the 64-token chunks, one empty, one of a single token, one over
# two chunks), kept short: every case runs every kernel in the interpreter once per candidate.
CU_SEQLENS = torch.tensor([0, 5, 70, 70, 71, 150], dtype=torch.int32)
T, NUM_DOCS = int(CU_SEQLENS[-1]), len(CU_SEQLENS) - 1
# op -> (inputs, reference, Triton chunk and fused recurrent entry points)
OPS = {
    "gla": (lambda: gla_inputs(1, T, 1, 16, 32, scalar_gate=False, num_states=NUM_DOCS, gates="mixed"),
            naive_recurrent_gla, gla_triton_chunk, gla_triton_fused_recurrent),
    "gla_scalar": (lambda: gla_inputs(1, T, 1, 16, 32, scalar_gate=True, num_states=NUM_DOCS, gates="mixed"),
                   naive_recurrent_gla, gla_triton_chunk, gla_triton_fused_recurrent),
    "gated_delta_rule": (lambda: gated_delta_rule_inputs(1, T, 1, 16, 32, num_states=NUM_DOCS, gates="mixed"),
                         naive_gated_delta_rule, gated_delta_rule_triton_chunk,
                         gated_delta_rule_triton_fused_recurrent),
    "diagonal_scan": (lambda: diagonal_scan_inputs(1, T, 1, 40, num_states=NUM_DOCS, gates="mixed"),
                      naive_diagonal_scan, diagonal_scan_triton_chunk, diagonal_scan_triton_fused_recurrent),
    # a 2x2 block per channel: 12 channels, one ragged block of the first two candidates, two of the third
    "block_diagonal_scan": (lambda: block_diagonal_scan_inputs(1, T, 1, 12, num_states=NUM_DOCS, gates="mixed"),
                            naive_block_diagonal_scan, block_diagonal_scan_triton_chunk,
                            block_diagonal_scan_triton_fused_recurrent),
    # GLA's scalar-gate kernels on the mLSTM's stabilised gates, over V + 1 = 17 value columns (ragged blocks)
    "mlstm": (lambda: mlstm_inputs(1, T, 1, 16, 16, num_states=NUM_DOCS), naive_recurrent_mlstm, chunk_mlstm,
              fused_recurrent_mlstm),
}


def _import_kernels():
    """Import every Triton kernel module, so that AUTOTUNERS lists them all."""
    import kernels.block_diagonal_scan.fused_recurrent  # noqa: F401
    import kernels.conv.triton_conv  # noqa: F401
    import kernels.diagonal_scan.fused_recurrent  # noqa: F401
    import kernels.gated_delta_rule.fused_recurrent  # noqa: F401
    import kernels.gla.fused_recurrent  # noqa: F401
    import kernels.mlstm.fused_recurrent  # noqa: F401
    import kernels.norm.triton_norm  # noqa: F401
    import kernels.rotary.triton_rotary  # noqa: F401


_import_kernels()
MOST_CANDIDATES = max(len(tuner.candidates) for tuner in AUTOTUNERS)


def test_every_kernel_has_few_candidates_heuristic_first():
    assert AUTOTUNERS and all(1 <= len(tuner.candidates) <= 3 for tuner in AUTOTUNERS), \
        {tuner.base_fn.__name__: len(tuner.candidates) for tuner in AUTOTUNERS}
    keys = {tuner.base_fn.__name__: tuner.keys for tuner in AUTOTUNERS}
    assert not [name for name, key in keys.items() if {"T", "B"} & set(key)], keys  # never tuned per length


def norm_results(norm, device: str) -> dict:
    """y and rstd of an RMSNorm with rms_norm's signature, plain and gated before and after, on 7 rows of 37
    channels (ragged row blocks and a row width that is no power of two)."""
    generator = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(7, 37, generator=generator).to(device) for _ in range(2))
    weight = torch.rand(37, generator=generator).to(device) + 0.5
    results = {}
    for label, gate_, before in (("plain", None, True), ("gated", gate, True), ("gate_first", gate, False)):
        y, rstd = norm(x, weight, 1e-5, torch.float32, gate_, before)
        results.update({f"{label}:y": y.cpu(), f"{label}:rstd": rstd.cpu()})
    return results


def rotary_results(rotate, device: str) -> dict:
    """3 rows of 5 heads of 24 (ragged head blocks, a width that is no power of two) at far apart positions."""
    generator = torch.Generator().manual_seed(0)
    freq = 10000.0 ** (-torch.arange(12, dtype=torch.float32) / 12)
    x = torch.randn(3, 5, 24, generator=generator)
    inputs = (x, torch.tensor([0, 77, 4099]), torch.cat((freq, freq)))
    return {"rotated": rotate(*(t.to(device) for t in inputs)).cpu()}


def run_op(op: str, index: int | None = None) -> tuple[dict, dict]:
    """(results of the Triton path in fp32, the fp64 reference's) for one op; candidate `index` of every
    kernel when given. The short convolution runs with 80 channels: ragged token and channel blocks. The norm
    and the rotary compare with their fp32 PyTorch formulas."""
    pinned = pinned_config(index) if index is not None else contextlib.nullcontext()
    if op in ("norm", "rotary"):
        results, entry_point, reference = (
            (norm_results, rms_norm, lambda x, w, eps, _, gate, before: naive_rms_norm(x, w, eps, gate, before))
            if op == "norm" else (rotary_results, rotate_rows, naive_rotate_rows))
        with pinned:
            actual = results(entry_point, DEVICE)
        return actual, results(reference, "cpu")
    if op == "conv":
        inputs, upstream = conv_inputs(1, T, 80, 4, NUM_DOCS)
        expected = run_conv(naive_causal_conv1d, inputs, upstream, CU_SEQLENS)
        inputs = {name: x.to(DEVICE) for name, x in inputs.items()}
        upstream = {name: x.to(DEVICE) for name, x in upstream.items()}
        with pinned:
            actual = run_conv(causal_conv1d, inputs, upstream, CU_SEQLENS.to(DEVICE), dtype=torch.float32)
        return {name: x.cpu() for name, x in actual.items()}, expected
    make, reference, *paths = OPS[op]
    inputs, upstream = make()
    runner = run_scan if op.endswith("diagonal_scan") else run  # the scans' inputs are a, b, not q, k, v
    expected = runner(reference, inputs, upstream, torch.float64, "cpu", CU_SEQLENS)
    with pinned:
        actual = {f"{i}:{name}": x for i, path in enumerate(paths)
                  for name, x in runner(path, inputs, upstream, torch.float32, DEVICE, CU_SEQLENS).items()}
    return actual, {f"{i}:{name}": x for i in range(len(paths)) for name, x in expected.items()}


@pytest.fixture
def triton_paths(monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", "triton")  # the convolution's entry point dispatches by backend


@pytest.mark.usefixtures("nan_buffers", "triton_paths")
@pytest.mark.parametrize("index", range(MOST_CANDIDATES))
@pytest.mark.parametrize("op", [*OPS, "conv", "norm", "rotary"])
def test_every_candidate_matches_the_reference(op, index):
    assert_matches(*run_op(op, index), TOL)


@contextlib.contextmanager
def every_launch_twice():
    """Launch every Triton kernel twice in a row on the same arguments and record, per kernel, the tensor
    arguments whose bytes differ after the second launch (a kernel that rewrites its own buffers)."""
    if interpret_mode():
        from triton.runtime.interpreter import InterpretedFunction as Launcher
    else:
        from triton.runtime.jit import JITFunction as Launcher
    launch = Launcher.run
    differences: dict[str, list[int]] = {}

    def launch_twice(self, *args, **kwargs):
        if kwargs.get("warmup"):  # a compile, not a launch
            return launch(self, *args, **kwargs)
        launch(self, *args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        after_one = [t.clone() for t in tensors]
        result = launch(self, *args, **kwargs)
        differences.setdefault(self.fn.__name__, []).extend(
            i for i, (one, two) in enumerate(zip(after_one, tensors))
            if not torch.equal(one.contiguous().view(torch.uint8), two.contiguous().view(torch.uint8)))
        return result

    Launcher.run = launch_twice
    try:
        yield differences
    finally:
        Launcher.run = launch


@pytest.mark.usefixtures("triton_paths")
@pytest.mark.parametrize("op,kernels", [("gla", 10), ("gla_scalar", 10), ("gated_delta_rule", 9),
                                        ("diagonal_scan", 5), ("block_diagonal_scan", 5), ("conv", 2), ("norm", 1), ("rotary", 1)])
def test_every_kernel_gives_the_same_result_when_launched_twice(op, kernels):
    with every_launch_twice() as differences:
        assert_matches(*run_op(op), TOL)
    assert len(differences) == kernels, sorted(differences)  # every forward and backward kernel ran
    assert not {name: args for name, args in differences.items() if args}, differences
