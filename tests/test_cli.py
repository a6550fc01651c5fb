"""``python -m fusion`` as scripts call it: a real subprocess, exit codes, stdout and stderr."""

import json
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import build_pair


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fusion", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("cli"), layout="llava")


def test_merge_with_parameters_and_progress(pair, tmp_path):
    out = tmp_path / "fused"
    run = cli("merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "neu-p-bread",
              "--set", "top_ratio=0.1", "--set", "density=0.8", "--out", str(out), "--device", "cpu", "--seed", "3", "--shard-size", "30KB")
    assert run.returncode == 0, run.stderr
    assert "merging" in run.stderr and "100%" in run.stderr
    recipe = json.loads((out / "fusion_recipe.json").read_text())
    assert recipe["method"] == "neuron_fusion" and recipe["seed"] == 3
    assert recipe["params"]["inner"] == "breadcrumbs" and recipe["params"]["density"] == 0.8 and recipe["params"]["top_ratio"] == 0.1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert str(out) in run.stdout
    again = cli("merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "neu-p-bread",
                "--set", "top_ratio=0.1", "--set", "density=0.8", "--out", str(out), "--device", "cpu", "--seed", "3", "--quiet")
    assert again.returncode == 0 and "already there" in again.stdout


def test_plain_llm_pair_merges_every_tensor(tmp_path):
    llm = build_pair(tmp_path, layout="llm")
    run = cli("merge", "--tuned", str(llm.tuned), "--base", str(llm.base), "--method", "task_arithmetic", "--set", "lambda=0", "--out", str(tmp_path / "o"), "--quiet")
    assert run.returncode == 0, run.stderr
    out = {}
    for f in (tmp_path / "o").glob("*.safetensors"):
        out.update(load_file(f))
    base = {}
    for f in llm.base.glob("*.safetensors"):
        base.update(load_file(f))
    assert out.keys() == base.keys() and all(torch.equal(out[k], base[k]) for k in out)


def test_inspect_prints_a_table_and_writes_json_and_plot(pair, tmp_path):
    run = cli("inspect", "--tuned", str(pair.tuned), "--base", str(pair.base), "--set", "top_ratio=0.03125", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png"))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:4] == ["layer", "kind", "neurons", "located"]
    assert any(line.split()[:4] == ["0", "ffn", "64", "2"] for line in lines)
    assert "neurons located" in run.stdout
    assert json.loads((tmp_path / "r.json").read_text())["kinds"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "ties", "--set", "density=2"], "'density' of method 'ties' is 2.0"),
        (["--method", "ties", "--set", "density"], "--set expects NAME=VALUE"),
        (["--method", "dare", "--device", "cuda"], "no CUDA GPU"),
        (["--method", "task_arithmetic", "--set", "lambda=nan"], "'lambda' of method 'task_arithmetic' must be a finite number"),
        (["--method", "neu-p-bread", "--set", "gamma=inf"], "'gamma' of method 'neu-p-bread' must be a finite number"),
        (["--method", "dare", "--seed", "-1"], "seed must be a non-negative integer"),
    ],
)
def test_errors_exit_2_with_one_line(pair, tmp_path, args, fragment):
    run = cli("merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--out", str(tmp_path / "x"), *args)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and fragment in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x").exists()


def test_methods_lists_every_method():
    run = cli("methods")
    assert run.returncode == 0
    for name in ("task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neuron_fusion", "neu-p-taska", "neu-p-bread"):
        assert f"\n{name}:" in "\n" + run.stdout


@pytest.mark.parametrize("args", [["methods"], ["--help"], ["merge", "--help"]])
def test_listing_and_parsing_import_no_torch(args):
    code = "import sys\nfrom fusion.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n    print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines()[-1] == "False"


def test_console_script_is_the_cli_and_returns_its_status(capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["neuron-fusion"].partition(":")
    main = getattr(import_module(module), func)
    assert main(["methods"]) == 0
    listed = "\n" + capsys.readouterr().out
    names = ("task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neuron_fusion", "neu-p-taska", "neu-p-bread")
    assert all(f"\n{name}:" in listed for name in names)


# --- the output and eval's checks: one line, exit 2, before any work -----------------------


@pytest.mark.parametrize(
    "limit, out, fragment",
    [("0", "results", "--limit must be at least 1, got 0"), ("-2", "results", "--limit must be at least 1, got -2"),
     ("1", "file/results", "is a file, in the way of the directory")],
)
def test_eval_checks_limit_and_out_before_any_scoring(tmp_path, limit, out, fragment):
    (tmp_path / "file").write_text("x")
    run = cli("eval", "--preset", "pocket", "--methods", "ties", "--limit", limit, "--out", str(tmp_path / out))
    assert run.returncode == 2 and run.stdout == ""  # no model was scored
    assert run.stderr.startswith("error: ") and fragment in run.stderr and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_eval_creates_its_out_first(tmp_path, monkeypatch):
    import fusion.evaluate
    from fusion.cli import main

    def scored(preset, methods, out, **kwargs):
        assert out.is_dir()  # made and proven writable before the scoring
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion.evaluate, "run_bench", scored)
    assert main(["eval", "--preset", "pocket", "--methods", "ties", "--out", str(tmp_path / "new" / "results")]) == 130
    assert [p.name for p in (tmp_path / "new" / "results").iterdir()] == []  # the probe file is gone


@pytest.mark.parametrize("make, out, fragment", [
    (lambda tmp: (tmp / "link").symlink_to(tmp), "link", "is a symbolic link"),
    (lambda tmp: (tmp / "file").write_text("x"), "file/fused", "is a file, in the way of the directory"),
])
def test_merge_into_an_unusable_out_is_one_line(pair, tmp_path, make, out, fragment):
    make(tmp_path)
    before = sorted(tmp_path.iterdir())
    run = cli("merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "ties", "--out", str(tmp_path / out))
    assert run.returncode == 2 and run.stderr.startswith("error: ") and fragment in run.stderr and len(run.stderr.splitlines()) == 1
    assert sorted(tmp_path.iterdir()) == before


def test_two_merges_into_one_out_at_once_both_succeed(pair, tmp_path):
    merge = [sys.executable, "-m", "fusion", "merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "ties",
             "--out", str(tmp_path / "fused"), "--quiet"]
    procs = [subprocess.Popen(merge, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    runs = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    assert [rc for _, _, rc in runs] == [0, 0] and not any("Traceback" in err for _, err, _ in runs)
    assert sorted("already there" in out for out, _, _ in runs) == [False, True]


def test_inspect_json_is_strict_and_a_bad_path_is_one_line(pair, tmp_path, monkeypatch, capsys):
    import fusion.merge
    from fusion.cli import main

    real = fusion.merge.inspect_pair

    def with_nan(*args, **kwargs):  # NaN weights give NaN scores
        report = real(*args, **kwargs)
        report["kinds"][0]["quantiles"] = dict.fromkeys(report["kinds"][0]["quantiles"], float("nan"))
        return report

    monkeypatch.setattr(fusion.merge, "inspect_pair", with_nan)
    inspect = ["inspect", "--tuned", str(pair.tuned), "--base", str(pair.base), "--json"]
    assert main([*inspect, str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))
    assert set(report["kinds"][0]["quantiles"].values()) == {None}
    capsys.readouterr()
    assert main([*inspect, str(tmp_path / "no" / "r.json")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no' / 'r.json'}: No such file or directory\n"
