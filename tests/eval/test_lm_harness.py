"""The lm-evaluation-harness adapter: lm-eval's simple_evaluate on small local tasks (offline), each of
the three request types checked against direct calls of the model."""
import json
from pathlib import Path

import pytest
import torch
import yaml

DATA = Path(__file__).parent / "lm_tasks"


def task_yaml(name: str, data: str, **fields) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATA / data)}},
            "test_split": "test", **fields}


TASKS = [
    task_yaml("baton_tiny_choice", "tiny_choice.jsonl", output_type="multiple_choice", doc_to_text="{{question}}",
              doc_to_choice="{{choices}}", doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}]),
    task_yaml("baton_tiny_rolling", "tiny_rolling.jsonl", output_type="loglikelihood_rolling", doc_to_text="",
              doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}]),
    task_yaml("baton_tiny_generate", "tiny_generate.jsonl", output_type="generate_until", doc_to_text="{{prompt}}",
              doc_to_target="{{answer}}", metric_list=[{"metric": "exact_match"}],
              generation_kwargs={"until": ["."], "max_gen_toks": 6, "do_sample": False}),
]


@pytest.fixture
def offline(monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def test_simple_evaluate_matches_direct_model_calls(tiny_checkpoint, tmp_path, offline):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import eval.lm_harness  # noqa: F401  (registers the model "baton")
    from eval.checkpoint import load_checkpoint

    for task in TASKS:
        (tmp_path / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # offline: only these local tasks
    results = lm_eval.simple_evaluate(model="baton", model_args={"checkpoint": str(tiny_checkpoint)}, batch_size=2,
                                      tasks=[t["task"] for t in TASKS], task_manager=tasks, log_samples=True)
    samples = results["samples"]
    loaded = load_checkpoint(tiny_checkpoint)
    model, tokenizer, eos = loaded.model, loaded.dataset.tokenizer, loaded.dataset.tokenizer.eos_id
    seq_len = loaded.cfg.train.seq_len

    @torch.no_grad()
    def direct(context: str, continuation: str) -> tuple[float, bool]:
        """One forward over the whole text (no chunks, no state): the sum of the continuation's log-probs."""
        whole = [eos] + tokenizer.encode(context + continuation)
        n = len(whole) - len([eos] + tokenizer.encode(context))
        logprobs = model(torch.tensor([whole[:-1]])).float().log_softmax(-1)[0]
        targets = torch.tensor(whole[1:])
        picked = logprobs.gather(-1, targets[:, None])[:, 0]
        return float(picked[-n:].sum()), bool((logprobs.argmax(-1) == targets)[-n:].all())

    choice = samples["baton_tiny_choice"]
    assert len(choice) == 3
    for sample in choice:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            logprob, greedy = response[0]
            expected, expected_greedy = direct(context, continuation)
            assert logprob == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy

    rolling = samples["baton_tiny_rolling"]
    assert max(len(tokenizer.encode(s["doc"]["text"])) for s in rolling) > seq_len  # scored past the training length
    for sample in rolling:
        assert sample["resps"][0][0] == pytest.approx(direct("", sample["arguments"][0][0])[0], abs=2e-3)

    for sample in samples["baton_tiny_generate"]:
        prompt = [eos] + tokenizer.encode(sample["arguments"][0][0])
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6)[0, len(prompt):].tolist()
        out = out[:out.index(eos)] if eos in out else out
        assert sample["resps"][0][0] == tokenizer.decode(out).split(".")[0]
    assert set(results["results"]) == {t["task"] for t in TASKS}
    json.dumps(results["results"])  # plain numbers, as lm-eval writes them
