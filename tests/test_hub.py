"""A merge's model card and its push to the Hub.

The card is checked with ``huggingface_hub``'s own card parser. The push goes to a **stand-in
for the Hub**: a small HTTP server on 127.0.0.1, written here, that answers the four endpoints
``huggingface_hub`` calls to create a repository and commit a folder (create, validate-yaml,
preupload, commit) and records what it receives. It is not the Hub: it accepts any card and
keeps everything in memory; it shows what the client sent.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from replicas import write_replica

from conftest import CliRun
from fusion.card import CARD_FILE, PLOT_FILE, card_metadata, card_text, merged_licence, reproduce_command
from fusion.output import RECIPE_FILE
from fusion.presets import ASSETS
from fusion.registry import resolve

POCKET = (str(ASSETS / "pocket" / "llava"), str(ASSETS / "pocket" / "base"))


class StandIn(BaseHTTPRequestHandler):
    """The stand-in's answers; ``server.calls`` records (method, path, headers, body)."""

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.calls.append(("POST", self.path, dict(self.headers), raw))
        if self.server.refuse:
            return self._reply(self.server.refuse, {"error": "You don't have the rights to create a model under this namespace"})
        if self.path == "/api/repos/create":
            asked = json.loads(raw)
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{asked['organization']}/{asked['name']}"})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
            self.server.commits.append(files)
            oid = f"{len(self.server.commits):040x}"
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})
        return self._reply(404, {"error": f"the stand-in does not answer {self.path}"})


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    import huggingface_hub.constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.calls, server.commits, server.refuse = [], [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")  # the token from the usual place
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_merge_writes_a_card_the_hub_reads(tmp_path: Path, cli: Callable[..., CliRun]) -> None:
    """Front matter as the Hub's own parser reads it, the located neurons per kind, the plot
    beside it, and a command that makes the same merge again; the card is in the recipe's
    file list, so reuse verifies it like the weights."""
    out = tmp_path / "fused"
    run = cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "neu-p-taska", "--set", "suppress=0.3", "--out", str(out))
    assert run.returncode == 0, run.stderr
    card = ModelCard.load(out / CARD_FILE)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert {"merge", "neuron-fusion", "neuron_fusion"} <= set(data["tags"])
    assert "base_model" not in data and "license" not in data  # local inputs are no Hub models; no card names a license
    assert "License not set" in card.text and "License not set" in run.stderr  # said once on the command line too
    assert "| ffn | 2,560 | 128 |" in card.text and f"]({PLOT_FILE})" in card.text
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert {CARD_FILE, PLOT_FILE} <= set(recipe["files"])
    assert str(tmp_path) not in card.content  # no absolute paths in a card meant for publishing
    command = reproduce_command(recipe, "again")
    assert "--set suppress=0.3" in command and "--method neuron_fusion" in command
    words = command.split()
    again = {w.split("=")[0]: w.split("=")[1] for w, prev in zip(words[1:], words) if prev == "--set"}
    assert resolve(words[words.index("--method") + 1], again).params == recipe["params"]  # the same recipe, exactly


def test_card_of_hub_models_names_both_and_their_licence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., CliRun]) -> None:
    """From Hub ids (a replica cache, offline): ``base_model`` lists the tuned model and the
    base as a merge, and the license both inputs' cards name is set; where they differ none is."""
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    replica = write_replica(cache, "llava-1.5-7b", tmp_path / "work")
    tuned, base = replica.tuned.repo_id, replica.base.repo_id
    for repo in (tuned, base):
        snapshot = next((cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        (snapshot / CARD_FILE).write_text("---\nlicense: llama2\n---\n# a card\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "fused"
    assert cli("merge", "--tuned", tuned, "--base", base, "--method", "ties", "--out", str(out)).returncode == 0
    data = ModelCard.load(out / CARD_FILE).data.to_dict()
    assert data["base_model"] == [tuned, base] and data["base_model_relation"] == "merge" and data["license"] == "llama2"
    assert "ties" in data["tags"] and not (out / PLOT_FILE).exists()  # ties locates no neurons: no plot
    assert merged_licence({"license": "llama2"}, {"license": "apache-2.0"}) == (
        None,
        "**License not set**: the tuned model's card says `llama2`, the base's `apache-2.0`. The merge is bound by both: "
        "set `license` in this card's front matter before publishing.",
    )
    assert merged_licence({"license": "other", "license_name": "a"}, {"license": "other", "license_name": "b"})[0] is None  # "other" is no id to agree on
    record = {"method": "ties", "params": resolve("ties").params, "seed": 0, "tuned": tuned, "base": str(tmp_path / "my-vicuna")}
    one = ModelCard(card_text(record, [], multimodal=False, licence=(None, "-"), out_name="x")).data.to_dict()
    assert "base_model" not in one and one["pipeline_tag"] == "text-generation"  # one Hub id alone would read as a fine-tune of it
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CARD_FILE).write_text("---\n: [unclosed\n---\n")
    assert card_metadata(tmp_path / "broken") == {} and card_metadata(tmp_path) == {}  # a card is documentation, never an error


def test_push_to_hub_sends_the_whole_output_as_one_commit(tmp_path: Path, stand_in: ThreadingHTTPServer, cli: Callable[..., CliRun]) -> None:
    out = tmp_path / "fused"
    run = cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "neu-p-taska", "--out", str(out), "--push-to-hub", "someone/pocket-fused", "--private")
    assert run.returncode == 0, run.stderr
    assert "someone/pocket-fused: pushed as one commit" in run.stdout
    paths = [path for _, path, _, _ in stand_in.calls]
    assert paths[0] == "/api/repos/create" and paths.count("/api/models/someone/pocket-fused/commit/main") == 1
    create = json.loads(stand_in.calls[0][3])
    assert create["name"] == "pocket-fused" and create["organization"] == "someone" and create["visibility"] == "private"
    assert all(headers.get("authorization") == "Bearer hf_stand_in_token" for _, _, headers, _ in stand_in.calls)
    (commit,) = stand_in.commits
    assert set(commit) == {p.name for p in out.iterdir()} and all(commit[name] == (out / name).read_bytes() for name in commit)
    # an existing output, pushed again with its own command: a second commit, the same files
    again = cli("push", str(out), "--repo", "someone/pocket-fused")
    assert again.returncode == 0 and len(stand_in.commits) == 2 and stand_in.commits[1] == commit


def test_nothing_is_pushed_unless_the_output_is_whole(tmp_path: Path, stand_in: ThreadingHTTPServer, cli: Callable[..., CliRun]) -> None:
    """A failed merge, a damaged output and a bad repository name each give one line and send
    nothing; a refusing Hub and an unreachable one give one line each."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("someone's")
    failed = cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "ties", "--out", str(taken), "--push-to-hub", "someone/x")
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    private = cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "ties", "--out", str(tmp_path / "never"), "--private")
    assert private.returncode == 2 and "--push-to-hub" in private.stderr and not (tmp_path / "never").exists()  # not silently ignored
    bad_name = cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "ties", "--out", str(tmp_path / "never"), "--push-to-hub", "no spaces/allowed")
    assert bad_name.returncode == 2 and "is not a Hub repository name" in bad_name.stderr and not (tmp_path / "never").exists()
    out = tmp_path / "fused"
    assert cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "ties", "--out", str(out)).returncode == 0
    (out / "model.safetensors").write_bytes(b"cut")
    damaged = cli("push", str(out), "--repo", "someone/x")
    assert damaged.returncode == 2 and "model.safetensors" in damaged.stderr and "nothing pushed" in damaged.stderr
    assert stand_in.calls == []
    assert cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "ties", "--out", str(tmp_path / "whole")).returncode == 0
    stand_in.refuse = 403
    refused = cli("push", str(tmp_path / "whole"), "--repo", "someone/x")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "HTTP 403" in refused.stderr and "write access" in refused.stderr
    stand_in.refuse = 401
    assert "HTTP 401" in cli("push", str(tmp_path / "whole"), "--repo", "someone/x").stderr
    stand_in.shutdown()
    stand_in.server_close()
    unreachable = cli("push", str(tmp_path / "whole"), "--repo", "someone/x")
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1 and "could not be reached" in unreachable.stderr
