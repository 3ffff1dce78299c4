"""Every Triton kernel compiles for real GPU targets and fits them, and an op's first call compiles few
variants, checked without a GPU (kernels/compile_check.py, through bench/gpu_compile.py's command line).

The checks run `python -m bench.gpu_compile --quick` and `--count` in subprocesses: compiled (not interpreted)
kernels need TRITON_INTERPRET unset before Triton decorates them, and the other kernel tests of this process run
under the interpreter. The quick set (bench.gpu_compile.quick_cases) is sm_80, sm_90 and sm_100 in bf16, each op
at its largest preset shape (GLA and Gated DeltaNet K=256, V=512; Mamba2's scalar gate K=128, V=64; the short
convolution), each kernel's configs compiled in order up to the first that fits unspilled, the cases spread over
the cores; the full sweep (every preset shape, every autotune config) is `python -m bench.gpu_compile`. Run alone
with `pytest -m gpu_compile`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.compile_check import compile_only, failures

pytestmark = pytest.mark.gpu_compile
ROOT = Path(__file__).resolve().parents[2]
# The kernels the entry points launch (bench.gpu_compile.run_op: chunk and fused recurrent, forward and backward).
# The shared stages (kernels/common) appear in every op.
SHARED = {"state_fwd_kernel", "output_kernel", "state_bwd_kernel"}
KERNELS = {
    "gated_delta_rule": SHARED | {"_wy_kernel", "_intra_bwd_v_kernel", "_intra_bwd_k_kernel", "_intra_bwd_wy_kernel",
                                  "_intra_bwd_dk_kernel", "_fused_recurrent_kernel"},
    "gla": SHARED | {"chunk_cumsum_kernel", "chunk_gla_fwd_A_kernel", "chunk_bwd_dA_kernel", "chunk_gla_bwd_dv_kernel",
                     "chunk_gla_bwd_dqk_intra_kernel", "chunk_gla_bwd_dqkg_kernel", "fused_recurrent_gla_fwd_kernel"},
    "gla_scalar": SHARED | {"chunk_cumsum_kernel", "chunk_scalar_fwd_A_kernel", "chunk_bwd_dA_kernel",
                            "chunk_gla_bwd_dv_kernel", "chunk_scalar_bwd_dqk_intra_kernel", "chunk_gla_bwd_dqkg_kernel",
                            "fused_recurrent_gla_fwd_kernel"},
    # GLA's scalar-gate chunk kernels (on V + 1 value columns) and the mLSTM's own decode step
    "mlstm": SHARED | {"chunk_cumsum_kernel", "chunk_scalar_fwd_A_kernel", "chunk_bwd_dA_kernel",
                       "chunk_gla_bwd_dv_kernel", "chunk_scalar_bwd_dqk_intra_kernel", "chunk_gla_bwd_dqkg_kernel",
                       "fused_recurrent_mlstm_fwd_kernel"},
    "diagonal_scan": {"scan_chunk_map_kernel", "scan_state_kernel", "scan_output_kernel", "scan_grad_kernel",
                      "fused_recurrent_scan_kernel"},
    "block_diagonal_scan": {"block_scan_chunk_map_kernel", "block_scan_state_kernel", "block_scan_output_kernel",
                            "block_scan_grad_kernel", "fused_recurrent_block_scan_kernel"},
    "conv": {"causal_conv_fwd_kernel", "causal_conv_bwd_kernel"},
    "norm": {"rms_norm_fwd_kernel"},
    "rotary": {"rotary_rows_kernel"},
}
ENV = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def test_kernels_compile_and_fit_gpu_targets(tmp_path):
    out = tmp_path / "gpu_compile.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_compile", "--quick", "--out", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["target"], r["dtype"], r["op"]) for r in rows}
    assert cases == {(t, "bf16", op) for t in ("sm_80", "sm_90", "sm_100") for op in KERNELS}
    for case in cases:
        compiled = {r["kernel"] for r in rows if (r["target"], r["dtype"], r["op"]) == case}
        assert compiled == KERNELS[case[2]], (case, compiled ^ KERNELS[case[2]])
    max_shared = json.loads(out.read_text())["max_shared"]
    for r in rows:
        assert r["spill_free"] >= 1 and r["stack"] == 0 and r["shared"] <= max_shared[r["target"]], r
    assert not failures(rows)


def test_first_call_compiles_few_variants(tmp_path):
    """The first forward+backward of each op at a new shape compiles at most 40 kernel variants (every
    candidate of every kernel it launches) on every target; Hopper runs only the heuristic configs."""
    out = tmp_path / "count.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_compile", "--count", "--out", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["target"], r["op"]) for r in rows} == {(t, op) for t in ("sm_80", "sm_90", "sm_100") for op in KERNELS}
    for r in rows:
        decode_only = {"fused_recurrent_gla_fwd_kernel", "_fused_recurrent_kernel", "fused_recurrent_scan_kernel",
                       "fused_recurrent_mlstm_fwd_kernel", "fused_recurrent_block_scan_kernel"}
        assert set(r["per_kernel"]) == KERNELS[r["op"]] - decode_only, r
        assert 0 < r["variants"] <= 40, r
        if r["target"] == "sm_90":  # one config per kernel: a variant per specialisation launched (at most two:
            # with and without a final state, or T stored; the norm's three: plain, gated before or after it)
            assert max(r["per_kernel"].values()) <= (3 if r["op"] == "norm" else 2), r


def test_failures_name_each_reason():
    row = dict(target="sm_90", op="gated_delta_rule", dtype="bf16", K=256, V=512, kernel="_intra_bwd_kernel",
               registers=255, stack=3056, shared=1024, fit=2, spill_free=0)
    assert failures([row]) == ["_intra_bwd_kernel sm_90 gated_delta_rule bf16 K=256 V=512: every fitting config "
                               "spills (least: 3056 bytes of stack)"]
    assert "no config fits" in failures([dict(row, fit=0, shared=500_000)])[0]
    assert "PTXASError" in failures([dict(row, kernel="-", error="PTXASError: boom")])[0]
    assert failures([dict(row, spill_free=1, stack=0)]) == []


def test_compile_only_restores_the_driver():
    import triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    drivers = triton.runtime.driver
    before = drivers._active, JITFunction.run, Autotuner.prune_configs
    with pytest.raises(RuntimeError, match="inside"):
        with compile_only("sm_90", quick=True):
            assert drivers._active.get_current_target().arch == 90
            assert JITFunction.run is not before[1] and Autotuner.prune_configs is not before[2]
            raise RuntimeError("inside")
    assert (drivers._active, JITFunction.run, Autotuner.prune_configs) == before


@pytest.mark.parametrize("setting", ["0", "1"])
def test_baton_autotune_switch(setting):
    """BATON_AUTOTUNE=0 leaves every kernel its heuristic config (no tuning at all); otherwise every candidate
    stays (the architecture's share is chosen at launch). Read when the kernels are decorated: a fresh process."""
    script = ("import json, kernels.conv.triton_conv, kernels.gla.fused_recurrent\n"
              "import kernels.gated_delta_rule.fused_recurrent\n"
              "from kernels.tuning import AUTOTUNERS\n"
              "print(json.dumps([[len(t.configs), len(t.candidates), t.configs[0] is t.candidates[0]]\n"
              "                  for t in AUTOTUNERS]))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**ENV, "BATON_AUTOTUNE": setting},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuners = json.loads(proc.stdout)
    assert len(tuners) >= 16 and all(heuristic_first for _, _, heuristic_first in tuners)
    assert all(configs == (1 if setting == "0" else candidates) for configs, candidates, _ in tuners), tuners
