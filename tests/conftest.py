"""The running app, started once per test session for the API and browser tests, and the
command line called in this process.

``python app.py`` runs as a subprocess on a free loopback port, on the pocket preset, with a
temporary fusion cache (so it really fuses), exactly as a user starts it. ``python -m fusion``
runs in this process (``cli``): a subprocess costs a second of start-up per call, and
test_cli.py keeps one real one for the exit status.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from fusion.architectures import IN_MEMORY, detect_layout, layout_named
from fusion.cli import main

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 180.0


@dataclass(frozen=True)
class RunningApp:
    url: str
    ready_seconds: float  # from process start until the models are loaded
    log: Path
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> dict | None:
    """The app's load state from its /status endpoint (plain HTTP: no client needed yet)."""
    request = urllib.request.Request(f"{url}gradio_api/call/status", data=b'{"data": []}', headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            event_id = json.load(r)["event_id"]
        with urllib.request.urlopen(f"{url}gradio_api/call/status/{event_id}", timeout=10) as r:
            lines = r.read().decode().splitlines()
    except OSError:
        return None
    data = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    return data[-1][0] if data and isinstance(data[-1], list) else None


@contextmanager
def running_app(tmp: Path, preset: str = "pocket", args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Iterator[RunningApp]:
    """``python app.py [args]`` on ``preset``, a free loopback port and a fresh fusion cache
    under ``tmp``, until the block ends (also used by benchmarks/screenshots.py); ``env`` adds
    environment variables (a replica hub cache)."""
    port = free_port()
    env = {
        **os.environ,
        **(env or {}),
        "NF_PRESET": preset,
        "NF_DEVICE": "cpu",
        "NEURON_FUSION_CACHE": str(tmp / "cache"),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
    }
    log = tmp / "app.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while not ((status := _status(url)) and status["state"] != "loading"):
            if proc.poll() is not None or time.perf_counter() - start > READY_TIMEOUT:
                raise RuntimeError(f"app did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        if status["state"] != "ready":
            raise RuntimeError(f"app failed to load: {status}\n{log.read_text()[-3000:]}")
        yield RunningApp(url, time.perf_counter() - start, log, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    with running_app(tmp_path_factory.mktemp("app")) as running:
        print(f"\napp ready {running.ready_seconds:.1f} s after start")
        yield running


def queue_call(url: str, api_name: str, data: list, session: str, timeout: float = 120.0) -> dict:
    """Call any event handler of the running app the way a raw client can, hidden or not:
    ``POST /gradio_api/queue/join`` with its ``fn_index`` and a session hash of our choosing,
    then read the session's event stream until the call completes. Returns the completion
    message (``{"success": bool, "output": {...}}``), with the warnings the handler showed
    (``"warnings"``: a page handler's refusal is one, ``refusal``)."""
    with urllib.request.urlopen(f"{url}config", timeout=10) as r:
        dependencies = json.load(r)["dependencies"]
    fn_index = next(i for i, d in enumerate(dependencies) if d.get("api_name") == api_name)
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}).encode()
    join = urllib.request.Request(f"{url}gradio_api/queue/join", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(join, timeout=10) as r:
        json.load(r)
    deadline = time.monotonic() + timeout
    warnings = []
    with urllib.request.urlopen(f"{url}gradio_api/queue/data?session_hash={session}", timeout=timeout) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("data:"):
                message = json.loads(line[len("data:"):])
                if message.get("msg") == "log" and message.get("level") == "warning":
                    warnings.append(message.get("log"))
                if message.get("msg") == "process_completed":
                    return {**message, "warnings": warnings}
            if time.monotonic() > deadline:
                break
    raise TimeoutError(f"{api_name} did not complete in {timeout} s")


def refusal(done: dict) -> str | None:
    """What the app said instead of answering, if it refused: an API endpoint's error, or a
    page handler's one warning (shown as one toast, every output left as it was)."""
    if not done.get("success"):
        return done["output"].get("error") or ""
    warnings = done.get("warnings") or []
    assert len(warnings) <= 1, warnings  # one toast per refusal
    return warnings[0] if warnings else None


class CliRun(NamedTuple):
    """One ``fusion.cli.main`` call, its fields named as ``subprocess.run`` names them."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """``python -m fusion ARGS`` in this process: ``cli(*ARGS)`` is main's status and what this
    call alone printed (progress and notes go to stderr)."""

    def run(*args: str) -> CliRun:
        capsys.readouterr()  # drop what the test printed before
        status = main(list(args))
        return CliRun(status, *capsys.readouterr())

    return run


def safetensors_in(directory: Path) -> dict[str, Any]:
    """Every tensor of a directory's safetensors files, by name."""
    from safetensors.torch import load_file

    return {k: v for f in directory.glob("*.safetensors") for k, v in load_file(f).items()}


def in_memory_equals_written(pair: Any, out: Path) -> int:
    """Assert that the fused model built in memory holds the tensors ``fuse`` wrote to ``out``
    (the on-disk layout mapped to transformers' names); returns how many were compared."""
    on_disk = safetensors_in(out)
    disk, memory = detect_layout(list(on_disk)), layout_named(IN_MEMORY)
    state = pair.fused.model.state_dict()
    for name, tensor in on_disk.items():
        base_name = disk.base_key(name)
        key = memory.tuned_key(base_name) if base_name else "model." + name
        assert torch.equal(state[key], tensor), key
    return len(on_disk)
