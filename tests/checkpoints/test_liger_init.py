"""train.py init.from=<Transformer> init.linearize=liger: the run's model is the teacher's with its attention layers
turned into Liger layers (every Nth kept with init.keep_attention_every), its weights copied, LoRA the only new
parameters; the base stays frozen under LoRA; exports (either format) hold the merged model; LoRA fine-tuning lowers
the loss under FSDP2 (with sequence parallelism) and DeepSpeed ZeRO; an imported HF Llama goes through import ->
linearize -> fine-tune -> export -> transformers' generate; bad input is one line and exit 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train

from checkpoints import load_model, write_export
from checkpoints.initial import import_export
from model import LM
from model.lora import is_lora_parameter
from tests.checkpoints.hf_models import TEXT, make_hf_model
from tests.training_runs import ENV, REPO, losses, run_train, torchrun

TEACHER_STEPS = 40
LORA = ["model.lora.rank=4", "model.lora.targets=[q_proj,k_proj,v_proj,o_proj]"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """transformer_tiny's pattern at SMALL's width, trained briefly, exported."""
    root = tmp_path_factory.mktemp("liger")
    run_train("model=transformer_tiny", f"train.max_steps={TEACHER_STEPS}", f"train.checkpoint_every={TEACHER_STEPS}",
              "optim.lr=3e-3", f"run.dir={root / 'teacher_run'}", "eval.tasks=[]", "eval.sample_tokens=0")
    proc = subprocess.run([sys.executable, "-m", "scripts.export",
                           f"checkpoint={root / 'teacher_run' / 'checkpoints' / f'step_{TEACHER_STEPS:06d}'}",
                           f"out={root / 'teacher'}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "teacher"


def linearize(teacher, run_dir, *overrides, launcher=()):
    return run_train(f"init.from={teacher}", "init.linearize=liger", f"run.dir={run_dir}", "eval.tasks=[ppl]",
                     *overrides, launcher=launcher)


def test_a_linearized_run_copies_the_weights_trains_only_lora_and_exports_merged(teacher, tmp_path):
    run_dir = tmp_path / "run"
    linearize(teacher, run_dir, *LORA, "init.keep_attention_every=2", "train.distill=0.5", "train.max_steps=3",
              "train.checkpoint_every=3", "optim.lr=1e-2")
    config = (run_dir / "config.yaml").read_text()
    assert "pattern: ZAZA" in config and "name: transformer_tiny_liger" in config and "distill: 0.5" in config
    assert all(r["loss"] > 0 for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "loss" in r)
    teacher_model, student = load_model(teacher), load_model(run_dir / "checkpoints" / "step_000003")
    # the teacher's parameters, name for name and value for value (frozen), plus LoRA's, which trained
    lora = {n: p for n, p in student.named_parameters() if is_lora_parameter(n)}
    assert student.num_params() == teacher_model.num_params() + sum(p.numel() for p in lora.values())
    assert len(lora) == 2 * 4 * 4  # A and B of q, k, v, o in 4 layers (the kept attention layers too)
    for name, param in teacher_model.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], param, rtol=0, atol=0, msg=name)
    assert all(p.abs().amax() > 0 for n, p in lora.items() if n.endswith("lora_B"))  # B left zero: it trained
    ids = torch.randint(0, 8000, (1, 40))
    with torch.no_grad():
        expected = student.eval()(ids)
    for form in ("baton", "hf"):
        proc = subprocess.run([sys.executable, "-m", "scripts.export",
                               f"checkpoint={run_dir / 'checkpoints' / 'step_000003'}", f"out={tmp_path / form}",
                               f"format={form}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        merged = load_model(tmp_path / form)
        assert merged.config.lora.rank == 0 and merged.config.layer_mixers()[:2] == ["liger", "attention"]
        assert merged.num_params() == teacher_model.num_params()
        with torch.no_grad():
            torch.testing.assert_close(merged.eval()(ids), expected, atol=1e-5, rtol=1e-4)
    # the merged export is itself a model to score or to start from: its config.yaml passes the schema
    proc = subprocess.run([sys.executable, "-m", "eval", f"checkpoint={tmp_path / 'baton'}", "tasks=[ppl]",
                           f"out={tmp_path / 'eval'}", "eval.held_out_tokens=500"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_full_fine_tuning_trains_every_parameter(teacher, tmp_path):
    linearize(teacher, tmp_path / "run", "train.max_steps=1", "train.checkpoint_every=1", "optim.lr=1e-2",
              "model.liger.gate=scalar")
    student, teacher_model = load_model(tmp_path / "run" / "checkpoints" / "step_000001"), load_model(teacher)
    assert student.config.pattern == "ZZZZ" and student.config.liger.gate == "scalar"
    assert student.num_params() == teacher_model.num_params()
    moved = [n for n, p in teacher_model.state_dict().items() if not torch.equal(student.state_dict()[n], p)]
    assert "blocks.0.mixer.q_proj.weight" in moved and "embed.weight" in moved


def test_a_linearized_lora_run_resumes_exactly(teacher, tmp_path):
    """Stopped after step 2 and resumed (LoRA's optimizer state, the frozen base, distillation): the losses of the
    run that never stopped, bit for bit."""
    run = [*LORA, "train.distill=0.5", "optim.schedule=constant", "optim.lr=1e-2", "train.checkpoint_every=2",
           "eval.tasks=[]", "eval.sample_tokens=0"]
    linearize(teacher, tmp_path / "straight", *run, "train.max_steps=4")
    linearize(teacher, tmp_path / "stopped", *run, "train.max_steps=2")
    linearize(teacher, tmp_path / "stopped", *run, "train.max_steps=4", "resume=auto")
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 4


@pytest.mark.parametrize("overrides, message", [
    (["init.linearize=lolcats"], "init.linearize: 'lolcats' is not one of liger"),
    (["init.keep_attention_every=1"], "init.keep_attention_every must be an integer >= 2"),
    (["init.keep_attention_every=two"], "init.keep_attention_every must be an integer >= 2"),
    (["train.distill=0.5"], "train.distill needs LoRA"),
    (["model.lora.rank=4", "model.lora.targets=[down_proj]"], "model.lora.targets: ['down_proj']"),
    (["model.liger.gate=mamba"], "model.liger.gate: 'mamba' is not one of gla, scalar"),
])
def test_bad_linearization_settings_are_one_line_and_exit_2(teacher, tmp_path, overrides, message, capsys):
    err = refused(capsys, tmp_path, f"init.from={teacher}", "init.linearize=liger", *overrides)
    assert err.startswith(f"error: {message}"), err


def test_a_model_without_full_attention_is_refused(tmp_path, capsys):
    gla = LM.from_config(dict(vocab_size=8192, d_model=64, pattern="GW", attention=dict(num_heads=2),
                              gla=dict(num_heads=2)))
    write_export(gla, tmp_path / "gla", None, None, {})
    assert refused(capsys, tmp_path, f"init.from={tmp_path / 'gla'}", "init.linearize=liger") == (
        "error: init.linearize=liger: the model (GW) has no full-attention layer (A) to linearize")
    assert "init.keep_attention_every needs init.linearize=liger" in refused(capsys, tmp_path,
                                                                             "init.keep_attention_every=2")
    assert refused(capsys, tmp_path, "init.linearize=liger").startswith("error: init.linearize=liger needs init.from=")


def refused(capsys, tmp_path, *overrides) -> str:
    """train.py's one-line error for these settings (in this process: the command line's exit path is
    tests/test_config.py's), after checking it exits 2 and writes no run directory."""
    assert train.main([*overrides, "train.max_steps=1", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not (tmp_path / "run").exists(), err
    return err


ONE_PROCESS: dict[tuple, dict[int, float]] = {}  # settings -> the one-process run's losses, shared by the cases
FINE_TUNE = ["model.lora.rank=8", "model.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj]",
             "train.max_steps=12", "train.checkpoint_every=12", "optim.warmup_steps=0", "train.micro_batch_size=null",
             "eval.tasks=[]", "eval.sample_tokens=0"]


def one_process(teacher, root, *settings) -> dict[int, float]:
    if settings not in ONE_PROCESS:
        run_dir = root / f"one_process_{len(ONE_PROCESS)}"
        linearize(teacher, run_dir, *FINE_TUNE, *settings)
        ONE_PROCESS[settings] = losses(run_dir)
    return ONE_PROCESS[settings]


@pytest.mark.slow
@pytest.mark.parametrize("engine, settings", [
    (["parallel=fsdp"], []),
    (["parallel=fsdp", "parallel.sp=2"], ["train.seq_len=128"]),
    (["parallel=deepspeed_zero2"], []),
    (["parallel=deepspeed_zero3"], ["train.distill=0.5"]),
], ids=["fsdp", "fsdp-sp2", "zero2", "zero3-distill"])
def test_lora_fine_tuning_lowers_the_loss_under_every_engine(teacher, tmp_path, engine, settings):
    """Two processes under each engine take the one-process run's steps (the same loss at every step: LoRA's
    gradients and updates, the frozen base), and those steps lower the loss: each batch's loss against the same
    batch's without learning (lr 1e-9; a paired comparison, since the batches' own spread is several times the
    effect of 12 LoRA steps on a teacher this small), from the second step on."""
    run_dir = tmp_path / "run"
    linearize(teacher, run_dir, *FINE_TUNE, *settings, *engine, "optim.lr=1e-2", launcher=torchrun(2))
    trained = losses(run_dir)
    reference = one_process(teacher, teacher.parent, *settings, "optim.lr=1e-2")
    assert sorted(trained) == sorted(reference) == list(range(1, 13))
    for step, loss in reference.items():
        assert trained[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), (step, trained, reference)
    if "parallel.sp=2" not in engine:  # (at 128 tokens a row these 12 steps do not lower the loss reliably)
        still = one_process(teacher, teacher.parent, *settings, "optim.lr=1e-9")
        gains = [still[step] - trained[step] for step in range(2, 13)]
        assert sum(gain > 0 for gain in gains) >= 9 and sum(gains) / len(gains) > 0.01, gains
    student, teacher_model = load_model(run_dir / "checkpoints" / "step_000012"), load_model(teacher)
    for name, param in teacher_model.state_dict().items():  # the base stayed frozen
        torch.testing.assert_close(student.state_dict()[name], param, rtol=0, atol=0, msg=name)
    assert any(p.abs().amax() > 0 for n, p in student.named_parameters() if n.endswith("lora_B"))


LOAD_AND_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
expected = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
ids = torch.tensor(expected["prompt"])
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=expected["new_tokens"], do_sample=False)
    error = (model(ids).logits - torch.tensor(expected["logits"])).abs().amax().item()
assert out.tolist() == expected["generated"], (out.tolist(), expected["generated"])
print("text:", repr(tokenizer.decode(out[0])))
print("max_error", error)
"""


def test_an_imported_llama_is_linearized_fine_tuned_exported_and_generates_in_transformers(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    import_export(tmp_path / "hf", tmp_path / "import")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i}.py").write_text(f"# document {i}\n" + TEXT[i * 7:] + TEXT[:i * 13])
    proc = subprocess.run([sys.executable, "-m", "data.prepare", f"source={corpus}", f"out={tmp_path / 'data'}",
                           f"tokenizer.path={tmp_path / 'import' / 'tokenizer.json'}", "workers=1",
                           "held_out_fraction=0.1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", f"init.from={tmp_path / 'import'}", "init.linearize=liger",
                           "model.liger.window=8", *LORA, "data=shards", f"data.path={tmp_path / 'data'}",
                           f"run.dir={run_dir}", "train.seq_len=64", "train.global_batch_size=2", "train.max_steps=2",
                           "optim.lr=1e-2", "logging.wandb.mode=disabled", "eval.tasks=[]", "eval.sample_tokens=0"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "export"
    checkpoint = run_dir / "checkpoints" / "step_000002"
    proc = subprocess.run([sys.executable, "-m", "scripts.export", f"checkpoint={checkpoint}", f"out={export}",
                           "format=hf"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((export / "config.json").read_text())["baton"]["pattern"] == "ZZ"
    student = load_model(checkpoint).eval()
    prompt = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {"prompt": prompt.tolist(), "new_tokens": 12, "logits": student(prompt).tolist(),
                    "generated": student.generate(prompt, 12, temperature=0).tolist()}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(tmp_path / "expected.json"), str(export)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("max_error")[-1]) <= 1e-4, proc.stdout
