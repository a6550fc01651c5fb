"""``neuron-fusion benchmark`` through the real lm-evaluation-harness, offline: a multiple-choice
task written here from the pocket world (local JSON lines and a task YAML, read with the
``json`` dataset builder, never the Hub), on the pocket pair's base, tuned and fused models.
The harness's scores are checked against the same choices scored here, model by model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import CliRun
from fusion.benchmark import load_suite, primary_score
from fusion.errors import FusionError
from fusion.presets import get_preset, probe_path

pytest.importorskip("lm_eval")

ITEMS = 12
DECLINE = "It cannot be determined from the image."


def capital_items() -> list[dict]:
    """Capital questions of the pocket probe set, each with its city and three others' as choices."""
    probes = [p for p in json.loads(probe_path(get_preset("pocket")).read_text())["text"] if p["skill"] == "capital"][: ITEMS + 3]
    cities = [p["answers"][0].removeprefix("is ") for p in probes]
    items = []
    for i, probe in enumerate(probes[:ITEMS]):
        country = re.search(r"capital of (\w+)", probe["question"]).group(1)
        # the right city, two others, and the tuned model's habit: pointing at an image that is not there
        choices = [f"The capital of {country} is {cities[(i + k) % len(cities)]}." for k in range(3)] + [DECLINE]
        order = sorted(range(4), key=lambda k: (k * 7 + i) % 4)  # the right one not always first
        items.append({"question": probe["question"], "choices": [choices[k] for k in order], "answer": order.index(0)})
    return items


def write_suite(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "capitals.jsonl").write_text("".join(json.dumps(item) + "\n" for item in capital_items()))
    (folder / "pocket_capitals.yaml").write_text(
        "task: pocket_capitals\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'capitals.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "USER: {{question}} ASSISTANT:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1\n"
    )
    suite = folder / "suite.json"
    suite.write_text(json.dumps({"language": ["pocket_capitals"], "visual": [], "include": "."}))
    return suite


def our_accuracy(model_dir: Path) -> float:
    """The share of items whose right choice the model gives the highest log-likelihood, as a
    continuation (after a space) of the task's prompt: the harness's acc, computed here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    right = 0
    for item in capital_items():
        context = f"USER: {item['question']} ASSISTANT:"
        prefix = tokenizer(context).input_ids
        scores = []
        for choice in item["choices"]:
            ids = tokenizer(context + " " + choice).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(prefix), len(ids))))
        right += max(range(4), key=scores.__getitem__) == item["answer"]
    return right / ITEMS


def test_benchmark_runs_lm_eval_on_base_tuned_and_fused(tmp_path: Path, cli: Callable[..., CliRun], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("NEURON_FUSION_CACHE", str(tmp_path / "cache"))
    suite = write_suite(tmp_path / "tasks")
    out = tmp_path / "bench"
    run = cli("benchmark", "--preset", "pocket", "--methods", "neu-p-taska", "--suite", str(suite), "--batch-size", "4", "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == ["base", "tuned", "fused"] and rows[2]["method"] == "neu-p-taska"
    base = get_preset("pocket").base
    for row, model_dir in zip(rows, [Path(base), out / "models" / "tuned-lm", out / "models" / "neu-p-taska-lm"]):
        assert row["metrics"] == {"pocket_capitals": "acc"}
        assert row["scores"]["pocket_capitals"] == pytest.approx(our_accuracy(model_dir)), row["label"]
        assert row["language_mean"] == row["overall"] == row["scores"]["pocket_capitals"] and row["visual_mean"] is None
    assert all(any((out / "raw" / "lm-eval" / name).rglob("results_*.json")) for name in ("base", "tuned", "neu-p-taska"))
    base_score, tuned_score, fused_score = (r["scores"]["pocket_capitals"] for r in rows)
    assert tuned_score < base_score and tuned_score < fused_score  # the harness sees the forgetting, and what fusion gives back
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| model | pocket_capitals | language mean | visual mean | overall |" and "| tuned |" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print("\n" + table)


def test_benchmark_refuses_what_it_cannot_run(tmp_path: Path, cli: Callable[..., CliRun]) -> None:
    """An unknown task, an unknown suite and a bad suite file: one line each, before any model work."""
    unknown = cli("benchmark", "--preset", "pocket", "--tasks", "no_such_task", "--out", str(tmp_path / "b"))
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "knows no task 'no_such_task'" in unknown.stderr
    assert not (tmp_path / "b" / "models").exists()
    missing = cli("benchmark", "--preset", "pocket", "--suite", "nope", "--out", str(tmp_path / "b"))
    assert missing.returncode == 2 and "not a suite name (paper)" in missing.stderr
    (tmp_path / "bad.json").write_text('{"language": "mmlu"}')
    with pytest.raises(FusionError, match="lists of task names"):
        load_suite(str(tmp_path / "bad.json"))
    paper = load_suite("paper")
    assert "mmlu" in paper.language and "pope" in paper.visual and paper.include is None
    assert primary_score({"acc,none": 0.5, "acc_stderr,none": 0.1}) == ("acc", 0.5)
    assert primary_score({"exact_match,strict-match": 0.25}) == ("exact_match", 0.25) and primary_score({"alias": "x"}) is None


def lmms_python() -> str | None:
    """An interpreter that has lmms-eval: ``NF_LMMS_PYTHON`` (CI makes one, as lmms-eval pins
    its own torch stack), or this one if it has it."""
    import importlib.util
    import os
    import sys

    return os.environ.get("NF_LMMS_PYTHON") or (sys.executable if importlib.util.find_spec("lmms_eval") else None)


def write_visual_suite(folder: Path) -> tuple[Path, list]:
    """Twelve image probes of the pocket set (three of each of four skills), drawn as PNG files, as an lmms-eval
    task with its own small utils.py: right when the reply holds one of the probe's answers."""
    from fusion.probes import preset_probes, probe_image, stratified

    _, every, root = preset_probes(get_preset("pocket"))
    # skills whose answer is a phrase the reply holds (yes/no and declines are judged otherwise)
    visual = stratified([p for p in every if p.skill in ("color", "shape", "count", "position")], 12)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, probe in enumerate(visual):
        probe_image(probe, root).save(folder / f"scene-{i}.png")
        rows.append({"question": probe.question, "answers": list(probe.answers), "image": str(folder / f"scene-{i}.png")})
    (folder / "scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(
        "from PIL import Image\n\n\n"
        "def doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n\n\n"
        "def process_results(doc, results):\n    reply = results[0].lower()\n"
        "    return {'acc': float(any(a.lower() in reply for a in doc['answers']))}\n"
    )
    (folder / "pocket_scenes.yaml").write_text(
        "task: pocket_scenes\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'scenes.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\ndoc_to_target: answers\n"
        "generation_kwargs:\n  max_new_tokens: 24\n  temperature: 0\n  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1\n"
    )
    suite = folder / "suite.json"
    suite.write_text(json.dumps({"language": [], "visual": ["pocket_scenes"], "include": "."}))
    return suite, visual


@pytest.mark.skipif(lmms_python() is None, reason="needs lmms-eval: NF_LMMS_PYTHON (.ci/run makes an environment for it)")
def test_benchmark_runs_lmms_eval_and_agrees_with_the_behaviour_bench(tmp_path: Path, cli: Callable[..., CliRun], monkeypatch: pytest.MonkeyPatch) -> None:
    """The visual side through the real lmms-eval (its llava_hf model) on the tuned and fused
    pocket LLaVA: each reply it logged is the behaviour bench's own reply to the same probe, and
    each score is the share the bench counts right; the base LLM, which sees no images, gets none."""
    from fusion.inference import ChatModel
    from fusion.probes import is_correct, probe_image

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("NEURON_FUSION_CACHE", str(tmp_path / "cache"))
    suite, probes = write_visual_suite(tmp_path / "tasks")
    out = tmp_path / "bench"
    run = cli("benchmark", "--preset", "pocket", "--methods", "neu-p-taska", "--suite", str(suite), "--lmms-python", lmms_python(), "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["base"]["scores"] == {} and rows["base"]["visual_mean"] is None
    (fused_dir,) = [p.parent for p in (tmp_path / "cache").glob("*/fusion_recipe.json")]
    root = probe_path(get_preset("pocket")).parent
    for kind, name, model_dir in (("tuned", "tuned", Path(get_preset("pocket").tuned)), ("fused", "neu-p-taska", fused_dir)):
        samples = [json.loads(line) for f in (out / "raw" / "lmms-eval" / name).rglob("*samples_pocket_scenes.jsonl") for line in f.read_text().splitlines()]
        logged = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
        bench = ChatModel.load(model_dir, True, device="cpu").answer([p.question for p in probes], [probe_image(p, root) for p in probes], max_new_tokens=24)
        assert logged == bench, kind
        assert rows[kind]["scores"]["pocket_scenes"] == pytest.approx(sum(is_correct(r, p) for r, p in zip(bench, probes)) / len(probes))
        assert rows[kind]["visual_mean"] == rows[kind]["scores"]["pocket_scenes"]
    print("\n" + (out / "results.md").read_text())


def test_a_harness_that_fails_or_is_missing_is_one_line(tmp_path: Path, cli: Callable[..., CliRun]) -> None:
    import sys

    from fusion.benchmark import _harness

    with pytest.raises(FusionError, match=r"^lm-eval could not evaluate some/model: OSError: no such model \(the whole log: .*log\.txt\)$"):
        _harness([sys.executable, "-c", "import sys; sys.exit('OSError: no such model')"], tmp_path / "raw", "lm-eval", "some/model")
    assert "no such model" in (tmp_path / "raw" / "log.txt").read_text()  # the harness's own words kept
    suite = tmp_path / "visual.json"
    suite.write_text(json.dumps({"language": [], "visual": ["pope"]}))
    missing = cli("benchmark", "--preset", "pocket", "--suite", str(suite), "--lmms-python", str(tmp_path / "no-python"), "--out", str(tmp_path / "b"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "need lmms-eval" in missing.stderr and not (tmp_path / "b" / "models").exists()


def test_each_mllm_type_gets_its_lmms_eval_model() -> None:
    """lmms-eval's llava_hf loads the transformers LLaVA classes only; Qwen2.5-VL goes through its own."""
    from fusion.benchmark import lmms_model

    assert [lmms_model(t) for t in ("llava", "llava_next", "llava_onevision", "qwen2_5_vl")] == ["llava_hf"] * 3 + ["qwen2_5_vl"]
    with pytest.raises(FusionError, match="not 'idefics2'"):
        lmms_model("idefics2")
