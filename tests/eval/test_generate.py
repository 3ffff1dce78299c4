"""`python -m eval.generate` on a tiny checkpoint: continuations of one prompt or a file of prompts of
different lengths, the speed report, and one line with exit 2 for bad input."""
import json

import pytest

from eval.generate import main


def test_one_prompt_prints_its_continuation_and_the_speed(tiny_checkpoint, capsys):
    assert main([f"checkpoint={tiny_checkpoint}", "prompt=The passkey is", "max_new_tokens=6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The passkey is")
    assert "prefill" in captured.err and "tokens/s" in captured.err and "peak memory" in captured.err


def test_a_prompts_file_decodes_as_one_batch_like_each_prompt_alone(tiny_checkpoint, tmp_path):
    prompts = ["The passkey is", "Remember it: the grass is green and the sky is blue. The passkey", "A"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    args = [f"checkpoint={tiny_checkpoint}", "max_new_tokens=5", "temperature=0.8", "top_k=20", "seed=3"]
    assert main([*args, f"prompts_file={tmp_path / 'prompts.txt'}", f"out={out}"]) == 0
    batched = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in batched] == prompts and all(r["tokens"] <= 5 for r in batched)
    greedy = [f"checkpoint={tiny_checkpoint}", "max_new_tokens=5"]
    assert main([*greedy, f"prompts_file={tmp_path / 'prompts.txt'}", f"out={out}"]) == 0
    batched = [json.loads(line)["continuation"] for line in out.read_text().splitlines()]
    for prompt, continuation in zip(prompts, batched):
        assert main([*greedy, f"prompt={prompt}", f"out={out}"]) == 0
        assert json.loads(out.read_text())["continuation"] == continuation


@pytest.mark.parametrize("args, expected", [
    ([], "prompt"),
    (["prompt=a", "max_new_tokens=many"], "max_new_tokens"),
    (["prompt=a", "cuda_graph=maybe"], "cuda_graph"),
    (["prompts_file=/no/such/file"], "/no/such/file"),
    (["prompt=a", "model.no_such_key=1"], "no_such_key"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, capsys, args, expected):
    assert main([f"checkpoint={tiny_checkpoint}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and expected in err
