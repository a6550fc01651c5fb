"""The command line as scripts call it: exit codes, stdout and stderr. ``fusion.cli.main`` runs
in this process (the ``cli`` fixture); one test runs ``python -m fusion`` for real, for the exit
status a script sees, and one runs a fresh interpreter to see what parsing imports."""

import json
import logging
import subprocess
import sys
import threading
from importlib import import_module
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CliRun
from fusion.cli import main
from fusion.output import Slot
from tiny_models import build_pair

LISTED = ("task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neuron_fusion", "neu-p-taska", "neu-p-bread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("cli"), layout="llava")


def assert_one_error_line(run: CliRun | subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit status 2 and a single 'error: ...' line on stderr that holds ``fragment``."""
    assert run.returncode == 2, run
    assert run.stderr.startswith("error: ") and fragment in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr


def assert_lists_every_method(stdout: str) -> None:
    assert all(f"\n{name}:" in "\n" + stdout for name in LISTED)


def test_python_m_fusion_exits_with_the_status_of_main(pair, tmp_path):
    """The one real ``python -m fusion``: the process exits 0, or 2 with one line and no traceback."""
    fusion = [sys.executable, "-m", "fusion"]
    listed = subprocess.run([*fusion, "methods"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stderr == ""
    assert_lists_every_method(listed.stdout)
    merge = ["merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "ties", "--set", "density=2", "--out", str(tmp_path / "x")]
    refused = subprocess.run([*fusion, *merge], capture_output=True, text=True, timeout=300)
    assert_one_error_line(refused, "'density' of method 'ties' is 2.0")
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()


def test_merge_with_parameters_and_progress(pair, tmp_path, cli):
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


def test_plain_llm_pair_merges_every_tensor(tmp_path, cli):
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


def test_inspect_prints_a_table_and_writes_json_and_plot(pair, tmp_path, cli):
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
def test_errors_exit_2_with_one_line(pair, tmp_path, cli, args, fragment):
    assert_one_error_line(cli("merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--out", str(tmp_path / "x"), *args), fragment)
    assert not (tmp_path / "x").exists()


def test_methods_lists_every_method(cli):
    run = cli("methods")
    assert run.returncode == 0
    assert_lists_every_method(run.stdout)


@pytest.mark.parametrize("args", [["methods"], ["--help"], ["merge", "--help"]])
def test_listing_and_parsing_import_no_torch(args):
    """A fresh interpreter: this process imported torch long ago."""
    code = "import sys\nfrom fusion.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n    print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines()[-1] == "False"


def test_console_script_is_the_cli_and_returns_its_status(capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["neuron-fusion"].partition(":")
    script = getattr(import_module(module), func)
    assert script(["methods"]) == 0
    assert_lists_every_method(capsys.readouterr().out)


# --- the output and eval's checks: one line, exit 2, before any work -----------------------


@pytest.mark.parametrize(
    "limit, out, fragment",
    [("0", "results", "--limit must be at least 1, got 0"), ("-2", "results", "--limit must be at least 1, got -2"),
     ("1", "file/results", "is a file, in the way of the directory")],
)
def test_eval_checks_limit_and_out_before_any_scoring(tmp_path, monkeypatch, cli, limit, out, fragment):
    monkeypatch.setenv("NEURON_FUSION_CACHE", str(tmp_path / "cache"))  # were it to fuse, not into the user's cache
    (tmp_path / "file").write_text("x")
    run = cli("eval", "--preset", "pocket", "--methods", "ties", "--limit", limit, "--out", str(tmp_path / out))
    assert run.stdout == ""  # no model was scored
    assert_one_error_line(run, fragment)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_eval_creates_its_out_first(tmp_path, monkeypatch, cli):
    import fusion.evaluate

    def scored(preset, methods, out, **kwargs):
        assert out.is_dir()  # made and proven writable before the scoring
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion.evaluate, "run_bench", scored)
    run = cli("eval", "--preset", "pocket", "--methods", "ties", "--out", str(tmp_path / "new" / "results"))
    assert run.returncode == 130 and run.stderr == "interrupted; nothing was left behind\n"
    assert [p.name for p in (tmp_path / "new" / "results").iterdir()] == []  # the probe file is gone


@pytest.mark.parametrize("make, out, fragment", [
    (lambda tmp: (tmp / "link").symlink_to(tmp), "link", "is a symbolic link"),
    (lambda tmp: (tmp / "file").write_text("x"), "file/fused", "is a file, in the way of the directory"),
])
def test_merge_into_an_unusable_out_is_one_line(pair, tmp_path, cli, make, out, fragment):
    make(tmp_path)
    before = sorted(tmp_path.iterdir())
    assert_one_error_line(cli("merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "ties", "--out", str(tmp_path / out)), fragment)
    assert sorted(tmp_path.iterdir()) == before


class Signal(logging.Handler):
    """Sets ``seen`` when a record's message holds ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_two_merges_into_one_out_at_once_both_succeed(pair, tmp_path, monkeypatch, capsys):
    """Two merges of one --out, in threads: the builder publishes only once the other is waiting
    for the lock, which then serves what it built. ``flock`` locks an open file, not a process,
    so two threads exclude each other as two processes do (``lockf`` would let both in, and the
    builder would wait in vain)."""
    waiting = Signal("another merge is building this output; waiting")
    publish = Slot.publish

    def publish_once_the_other_waits(slot: Slot, record: dict) -> dict:
        assert waiting.seen.wait(30), "the other merge never waited for the lock"
        return publish(slot, record)

    monkeypatch.setattr(Slot, "publish", publish_once_the_other_waits)
    merge = ["merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "ties", "--out", str(tmp_path / "fused"), "--quiet"]
    statuses, errors = [], []

    def run() -> None:
        try:
            statuses.append(main(merge))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    logging.getLogger().addHandler(waiting)  # the root's: main gives the fusion logger its own handler only if it has none
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        logging.getLogger().removeHandler(waiting)
    out, err = capsys.readouterr()
    assert errors == [] and statuses == [0, 0] and "Traceback" not in err
    assert "another merge is building this output" in err  # the note the waiting one shows
    assert sorted("already there" in line for line in out.splitlines()) == [False, True]


def test_inspect_json_is_strict_and_a_bad_path_is_one_line(pair, tmp_path, monkeypatch, cli):
    import fusion.merge

    real = fusion.merge.inspect_pair

    def with_nan(*args, **kwargs):  # NaN weights give NaN scores
        report = real(*args, **kwargs)
        report["kinds"][0]["quantiles"] = dict.fromkeys(report["kinds"][0]["quantiles"], float("nan"))
        return report

    monkeypatch.setattr(fusion.merge, "inspect_pair", with_nan)
    inspect = ["inspect", "--tuned", str(pair.tuned), "--base", str(pair.base), "--json"]
    assert cli(*inspect, str(tmp_path / "r.json")).returncode == 0
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))
    assert set(report["kinds"][0]["quantiles"].values()) == {None}
    bad = cli(*inspect, str(tmp_path / "no" / "r.json"))
    assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path / 'no' / 'r.json'}: No such file or directory\n"


TERMINATED_MID_MERGE = """
import os, signal, sys
import fusion.writer

real = fusion.writer.ShardedWriter.write

def write(self, name, tensor):  # the first tensor is being written: the process is told to stop
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(self, name, tensor)

fusion.writer.ShardedWriter.write = write
from fusion.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_merge_told_to_stop_leaves_nothing_behind(pair, tmp_path, name, status):
    """SIGTERM (a timeout, docker stop, systemd) and SIGHUP (a closed terminal) mid-merge are
    treated as Ctrl-C is: no half-written output, no staging folder, no lock; one line says so."""
    out = tmp_path / "parent" / "fused"
    out.parent.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", TERMINATED_MID_MERGE, name, "merge", "--tuned", str(pair.tuned), "--base", str(pair.base), "--method", "ties", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == status, run.stderr
    said = "interrupted" if name == "SIGINT" else f"terminated ({name})"
    assert run.stderr.splitlines()[-1] == f"{said}; nothing was left behind"
    assert list(out.parent.iterdir()) == []


def _rewritten(pair, tmp_path, edit=None, config=None) -> Path:
    """A copy of the pair's tuned model with its tensors (all in one file) passed through
    ``edit`` and/or its config.json replaced by the text ``config``."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "hostile"
    shutil.copytree(pair.tuned, out)
    if edit is not None:
        tensors = {}
        for shard in sorted(out.glob("model-*.safetensors")):
            tensors.update(load_file(shard))
            shard.unlink()
        (out / "model.safetensors.index.json").unlink()
        save_file(edit(tensors), out / "model.safetensors")
    if config is not None:
        (out / "config.json").write_text(config)
    return out


LM_WEIGHT = "language_model.model.layers.0.mlp.up_proj.weight"
EMBED = "language_model.model.embed_tokens.weight"


@pytest.mark.parametrize("edit, config, fragment", [
    (None, "[]", "config.json: a model config must be a JSON object, not a list"),
    (None, "null", "config.json: a model config must be a JSON object, not null"),
    (None, '"llava"', "config.json: a model config must be a JSON object, not a string"),
    (None, '{"model_type": "llava", "text_config": "llama"}', "'text_config' must be a JSON object, not a string"),
    (None, "[" * 200_000 + "]" * 200_000, "config.json: nested too deeply to be a model config"),
    (None, '{"n": ' + "9" * 5000 + "}", "config.json: not readable as JSON"),  # past Python's 4300-digit limit
    (lambda t: {}, None, "hold no tensors"),
    (lambda t: {**t, LM_WEIGHT: t[LM_WEIGHT].to(torch.float8_e4m3fn)}, None, f"'{LM_WEIGHT}' of"),
    (lambda t: {**t, LM_WEIGHT: t[LM_WEIGHT].to(torch.int32)}, None, "is int32; merging needs float32, float16 or bfloat16"),
    (lambda t: {**t, LM_WEIGHT: t[LM_WEIGHT] > 0}, None, "is bool; merging needs float32"),
    (lambda t: {**t, EMBED: t[EMBED].repeat(50, 1)}, None, f"cannot reconcile the shape of '{EMBED}'"),
])
def test_a_hostile_checkpoint_gets_one_error_line(pair, tmp_path, cli, edit, config, fragment):
    """Configs that are not objects or nest too deeply, a checkpoint without tensors, language-
    model weights stored as float8, integers or booleans, and 50 times the base's vocabulary
    rows: each one error line and exit 2, never a traceback, never a merge that copies them."""
    tuned = _rewritten(pair, tmp_path, edit, config)
    run = cli("merge", "--tuned", str(tuned), "--base", str(pair.base), "--method", "ties", "--out", str(tmp_path / "out"), "--quiet")
    assert_one_error_line(run, fragment)
    assert not (tmp_path / "out").exists()


def test_an_oversized_shard_index_is_refused_unread(pair, tmp_path, cli):
    tuned = _rewritten(pair, tmp_path)
    index = tuned / "model.safetensors.index.json"
    with open(index, "a") as f:
        f.write(" " * (17 << 20))  # still valid JSON, but no index is this big
    run = cli("merge", "--tuned", str(tuned), "--base", str(pair.base), "--method", "ties", "--out", str(tmp_path / "out"), "--quiet")
    assert_one_error_line(run, "MB is too large for a shard index (at most 16 MB)")


def test_inspect_checks_its_plot_name_before_any_work(pair, tmp_path, cli, monkeypatch):
    import fusion.merge

    monkeypatch.setattr(fusion.merge, "inspect_pair", lambda *a, **k: pytest.fail("the pair was inspected before the plot name was checked"))
    run = cli("inspect", "--tuned", str(pair.tuned), "--base", str(pair.base), "--plot", str(tmp_path / "curve.txt"))
    assert_one_error_line(run, "curve.txt: the name must end in one of")
    assert ".png" in run.stderr and not (tmp_path / "curve.txt").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--methods", ""], "--methods names no method"),
    (["--methods", " , "], "--methods names no method"),
    pytest.param(["--device", "cuda"], "sees no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
])
def test_eval_refuses_what_it_cannot_do_before_scoring(tmp_path, monkeypatch, cli, args, fragment):
    import fusion.evaluate

    monkeypatch.setattr(fusion.evaluate, "run_bench", lambda *a, **k: pytest.fail("models were scored"))
    run = cli("eval", "--preset", "pocket", *(args if "--methods" in args else ["--methods", "ties", *args]), "--out", str(tmp_path / "results"))
    assert_one_error_line(run, fragment)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("link, fragment", [
    (lambda tmp: tmp / "secret.json", "a symbolic link to"),  # a file outside the model
    (lambda tmp: Path("tokenizer_config.json"), "leads nowhere"),  # itself: a loop
])
def test_a_sidecar_link_must_stay_inside_the_model(pair, tmp_path, cli, link, fragment):
    tuned = _rewritten(pair, tmp_path)
    (tmp_path / "secret.json").write_text('{"password": "hunter2"}')
    (tuned / "tokenizer_config.json").unlink(missing_ok=True)
    (tuned / "tokenizer_config.json").symlink_to(link(tmp_path))
    run = cli("merge", "--tuned", str(tuned), "--base", str(pair.base), "--method", "ties", "--out", str(tmp_path / "out"), "--quiet")
    assert_one_error_line(run, fragment)
    assert "tokenizer_config.json" in run.stderr and not (tmp_path / "out").exists()


def test_a_vision_only_tuned_model_is_named_as_such(pair, tmp_path, cli):
    tuned = _rewritten(pair, tmp_path, edit=lambda t: {k: v for k, v in t.items() if not k.startswith("language_model")})
    run = cli("merge", "--tuned", str(tuned), "--base", str(pair.base), "--method", "ties", "--out", str(tmp_path / "out"), "--quiet")
    assert_one_error_line(run, "whose weights hold no language-model tensors")
    assert "language-model tensor 'multi_modal_projector" not in run.stderr


def test_eval_prints_its_own_progress_not_model_loading_bars(tmp_path, monkeypatch, cli):
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("NEURON_FUSION_CACHE", str(tmp_path / "cache"))
    run = cli("eval", "--preset", "pocket", "--methods", "ties", "--limit", "1", "--out", str(tmp_path / "results"))
    assert run.returncode == 0 and "| fused: ties |" in run.stdout
    assert "Loading weights" not in run.stderr and "Writing model shards" not in run.stderr
    assert hf_logging.is_progress_bar_enabled()  # as it was, for whoever calls next
