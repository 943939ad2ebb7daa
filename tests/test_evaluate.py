"""``nbllm.evaluate`` / ``%llm_eval`` (lm-evaluation-harness as a library) and lm-eval's ``local-completions``
against ``%llm_serve``, each against lm-eval's own ``hf`` model on the same weights, on local task files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import nbllm
from nbllm.errors import NbllmError

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The capital of France is", [" Paris", " Lyon", " Rome"], 0),
    ("Two plus two is", [" four", " five", " seven"], 0),
    ("The sky is", [" blue", " green", " loud"], 0),
    ("Cats like to eat", [" fish", " rocks", " cars"], 0),
    ("Water is", [" wet", " dry", " square"], 0),
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two local tasks: a multiple-choice one and a generation one, on local JSON data (lm-eval runs offline)."""
    folder = tmp_path_factory.mktemp("tasks")
    mc = folder / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    gen = folder / "gen.jsonl"
    gen.write_text("\n".join(json.dumps({"question": q, "answer": c[0].strip()}) for q, c, _ in QUESTIONS))
    (folder / "nbllm_mc.yaml").write_text(f"""task: nbllm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (folder / "nbllm_gen.yaml").write_text(f"""task: nbllm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
""")
    return folder


def _hf(tiny_model: Path, tasks: Path) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_model},device=cpu,dtype=float32",
                                   tasks=["nbllm_mc", "nbllm_gen"], task_manager=TaskManager(include_path=str(tasks)),
                                   log_samples=True)


@pytest.fixture(scope="module")
def hf_results(tiny_model: Path, tasks: Path) -> dict[str, Any]:
    return _hf(tiny_model, tasks)


def _lls(samples: list[dict[str, Any]]) -> list[float]:
    """Every choice's log-likelihood, sample by sample."""
    return [float(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]


def _texts(samples: list[dict[str, Any]]) -> list[str]:
    return [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("loader", ["transformers", "llama.cpp"])
def test_evaluate_equals_lm_evals_hf_model(engine: Any, tiny_model: Path, tiny_gguf: Path, tasks: Path,
                                           hf_results: dict[str, Any], loader: str) -> None:
    if loader == "transformers":
        engine.load(tiny_model)
    else:
        engine.load(tiny_gguf, cache_type="fp32")
    got = nbllm.evaluate("nbllm_mc,nbllm_gen", include_path=tasks)
    ours = _lls(got.sample_rows["nbllm_mc"])
    theirs = _lls(hf_results["samples"]["nbllm_mc"])
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert _texts(got.sample_rows["nbllm_gen"]) == _texts(hf_results["samples"]["nbllm_gen"])
    frame = got.frame()
    acc = frame[(frame.task == "nbllm_mc") & (frame.metric == "acc")].value.iloc[0]
    assert acc == pytest.approx(hf_results["results"]["nbllm_mc"]["acc,none"])
    assert got.versions["nbllm_gen"] == 2.0 and got.record is not None and got.record.mode == "eval"
    assert got.record.generation_options["tasks"] == ["nbllm_mc", "nbllm_gen"]


def test_local_completions_against_llm_serve_equals_hf(engine: Any, tiny_model: Path, tasks: Path,
                                                       hf_results: dict[str, Any]) -> None:
    """lm-eval's own OpenAI-compatible client against %llm_serve: the same per-choice log-likelihoods
    (within 1e-3) and the same greedy generations as lm-eval's hf model."""
    from lm_eval.tasks import TaskManager

    engine.load(tiny_model)
    server = nbllm.serve(port=0)
    try:
        args = (f"model={nbllm.status().model},base_url={server.url}/completions,tokenizer={tiny_model},"
                "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,tokenized_requests=True,"
                "add_bos_token=True")  # as the hf model: the tokenizer's BOS
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["nbllm_mc", "nbllm_gen"],
                                      task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    finally:
        from nbllm.serve import stop

        stop()
    assert _lls(out["samples"]["nbllm_mc"]) == pytest.approx(_lls(hf_results["samples"]["nbllm_mc"]), abs=1e-3)
    assert _texts(out["samples"]["nbllm_gen"]) == _texts(hf_results["samples"]["nbllm_gen"])


def test_llm_eval_magic_replays_and_bad_input_is_one_line(shell: Any, engine: Any, tiny_gguf: Path, tasks: Path,
                                                          tmp_path: Path, monkeypatch: Any) -> None:
    log = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(log))
    shell.run_line_magic("llm_load", str(tiny_gguf))
    first = shell.run_line_magic("llm_eval", f"nbllm_mc --limit 3 --include-path {tasks} -o e")
    assert len(first.sample_rows["nbllm_mc"]) == 3 and shell.user_ns["e"] is first
    with pytest.raises(NbllmError, match="lm-eval has no task 'no_such_task'.*nbllm.evaluate_tasks"):
        nbllm.evaluate("no_such_task", include_path=tasks)
    assert engine.loaded
    shell.run_line_magic("llm_replay", str(log))
    try:
        shell.run_line_magic("llm_load", str(tiny_gguf))
        again = shell.run_line_magic("llm_eval", f"nbllm_mc --limit 3 --include-path {tasks}")
        assert again.replayed and again.results == first.results
    finally:
        shell.run_line_magic("llm_replay", "off")


def test_lm_eval_missing_names_the_extra(engine: Any, monkeypatch: Any) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(NbllmError, match=r"nbllm\[eval\]"):
        nbllm.evaluate("nbllm_mc")
