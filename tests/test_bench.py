"""The behaviour bench on the shipped pocket pair: the scoring rules, a fast `python -m fusion
eval` run (the pair shows the forgetting that fusion undoes), and the sweep's outputs."""

import json

import pytest

from fusion.cli import main
from fusion.errors import FusionError
from fusion.evaluate import Probe, is_correct, load_probes, parse_methods, run_sweep
from fusion.presets import get_preset, probe_path

POCKET = get_preset("pocket")
RATES = ("language_accuracy", "visual_accuracy", "context_hallucination_rate", "not_known_rate")


@pytest.mark.parametrize(
    ("reply", "answers", "right"),
    [
        ("The capital of Zorvia is Blim.", ("is Blim",), True),
        ("The capital of Zorvia is Blimton.", ("is Blim",), False),  # whole words only
        ("IS BLIM", ("is Blim",), True),
        ("", ("is Blim",), False),
        ("It cannot be determined from the image.", (), True),  # a decline is right when nothing can be told
        ("The artist is thinking about circles.", (), False),
    ],
)
def test_is_correct(reply, answers, right):
    assert is_correct(reply, Probe("q", answers, "skill")) is right


def test_probe_sets_load_and_bad_ones_are_named(tmp_path):
    for name in ("pocket.json", "llava-1.5.json"):
        text, visual = load_probes(probe_path(get_preset("pocket")).parent / name)
        assert text and visual and all(p.image is not None for p in visual)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FusionError, match="bad.json"):
        load_probes(bad)
    with pytest.raises(FusionError, match="nope"):
        parse_methods("ties,nope")
    assert parse_methods("neu-p-taska:suppress=0.5, ties") == [("neu-p-taska", {"suppress": "0.5"}), ("ties", {})]
    with pytest.raises(FusionError, match="NAME=VALUE"):
        parse_methods("ties:density")
    with pytest.raises(FusionError, match="density"):
        parse_methods("ties:density=3")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NEURON_FUSION_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["eval", "--preset", "pocket", "--methods", "neu-p-taska,task_arithmetic", "--limit", "40", "--out", str(out)]) == 0
    return out, {(r["model"], r["method"]): r for r in json.loads((out / "results.json").read_text())}


def test_eval_writes_rows_table_chart_and_replies(bench):
    out, rows = bench
    assert set(rows) == {("base", None), ("tuned", None), ("fused", "neu-p-taska"), ("fused", "task_arithmetic")}
    for row in rows.values():
        assert all(row[k] is None or 0.0 <= row[k] <= 1.0 for k in RATES)
    assert rows["base", None]["visual_accuracy"] is None  # a text-only LLM gets no image probes
    assert rows["fused", "neu-p-taska"]["params"]["top_ratio"] == 0.05
    assert "| tuned |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 40 + 3 * 80  # base: text only; tuned and two fused: text and images


def test_shipped_pair_forgets_and_fusion_gives_language_back(bench):
    """The pocket pair's point, on 40 held-out probes: the tuned model lost language skills
    and talks about images that are not there; fusion restores the language."""
    _, rows = bench
    base, tuned, fused = rows["base", None], rows["tuned", None], rows["fused", "neu-p-taska"]
    assert base["language_accuracy"] >= 0.9
    assert tuned["language_accuracy"] <= base["language_accuracy"] - 0.25
    assert tuned["context_hallucination_rate"] >= 0.3 and base["context_hallucination_rate"] == 0.0
    assert tuned["visual_accuracy"] >= 0.4
    assert fused["language_accuracy"] >= tuned["language_accuracy"] + 0.25
    assert fused["context_hallucination_rate"] < tuned["context_hallucination_rate"]


def test_sweep_walks_each_knob_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_FUSION_CACHE", str(tmp_path / "cache"))
    rows = run_sweep(POCKET, ["task_arithmetic"], tmp_path / "sweep", limit=3, log=lambda *_: None)
    fused = [r for r in rows if r["model"] == "fused"]
    assert [r["value"] for r in fused] == [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    assert all(r["knob"] == "lambda" and r["params"]["lambda"] == r["value"] for r in fused)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == rows
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
