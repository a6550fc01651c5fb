"""Hostile rounds against a running app on 127.0.0.1, bounded loops each, as strangers on a
public Space would send them: abandoned streams, icon bombs, a flood of long Behaviour runs
from many sessions, a huge chat history, and a burst of uploads. After each round the server's
threads, memory and upload folder stay within stated bounds, and a second visitor (another
address, as the Space's proxy reports it in X-Forwarded-For) is still answered. The figures are
printed (``pytest -s``) and recorded as test properties."""

from __future__ import annotations

import io
import json
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import RunningApp, refusal, running_app
from studio.clients import PER_ADDRESS, UPLOAD_BYTES_PER_ADDRESS

TEXT_CHAT = "respond_2"  # the Text chat tab's send (the Image chat's are respond and respond_1)
STRANGER = "203.0.113.7"  # the abusive client, as the proxy names it
VISITOR = "198.51.100.2"  # someone else
THREAD_ALLOWANCE = 12  # threads above the idle server's that the rounds may leave
RSS_ALLOWANCE_GIB = 0.5  # growth of the peak resident memory over all the rounds


def proc_status(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def threads(pid: int) -> int:
    return proc_status(pid, "Threads")


def peak_rss_gib(pid: int) -> float:
    return proc_status(pid, "VmHWM") / 2**20


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.exists() else 0.0


def call(
    url: str, api_name: str, data: list, session: str, address: str, timeout: float = 120.0, abandon_after: int | None = None, listen: bool = True
) -> tuple[int, dict | None]:
    """Join the queue as a client behind the Space's proxy at ``address`` and read the event
    stream until the call completes (or, with ``abandon_after``, hang up after that many
    messages; with ``listen`` off, after joining). Returns the join's HTTP status and the
    completion message (None if abandoned, not listened to or refused)."""
    config = json.loads(urllib.request.urlopen(f"{url}config", timeout=10).read())
    fn_index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name)
    headers = {"Content-Type": "application/json", "X-Forwarded-For": address}
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}).encode()
    try:
        urllib.request.urlopen(urllib.request.Request(f"{url}gradio_api/queue/join", data=body, headers=headers), timeout=10).read()
    except urllib.error.HTTPError as err:
        return err.code, None
    if not listen:
        return 200, None
    seen, warnings = 0, []
    request = urllib.request.Request(f"{url}gradio_api/queue/data?session_hash={session}", headers={"X-Forwarded-For": address})
    with urllib.request.urlopen(request, timeout=timeout) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            message = json.loads(line[len("data:"):])
            seen += 1
            if abandon_after is not None and seen >= abandon_after:
                return 200, None  # the connection closes here: the visitor left
            if message.get("msg") == "log" and message.get("level") == "warning":
                warnings.append(message.get("log"))
            if message.get("msg") == "process_completed":
                return 200, {**message, "warnings": warnings}
    return 200, None


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("abuse")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[RunningApp]:
    """The app as on a Space (``SPACE_ID`` set: client addresses come from X-Forwarded-For)."""
    with running_app(home, args=["--queue-size", "64"], env={"SPACE_ID": "test/abuse"}) as app:
        yield app


@pytest.fixture(scope="module")
def idle(server: RunningApp) -> dict[str, float]:
    """The server at rest, after one ordinary question (so that lazy start-up is done)."""
    started = time.perf_counter()
    assert call(server.url, "compare_text", ["What sound does a cow make?"], "warm-up", VISITOR)[1]["success"]
    return {"threads": threads(server.pid), "rss": peak_rss_gib(server.pid), "latency": time.perf_counter() - started}


def visitor_latency(server: RunningApp, tag: str) -> float:
    """Seconds for a second visitor's ordinary question; it must be answered."""
    started = time.perf_counter()
    status, done = call(server.url, "compare_text", ["What is the opposite of hot?"], f"visitor-{tag}", VISITOR, timeout=180)
    assert status == 200 and done and done["success"], done
    return time.perf_counter() - started


def report(record_property, name: str, **figures: float) -> None:
    print(f"\n[abuse] {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    for key, value in figures.items():
        record_property(f"{name}_{key}", value)


def test_abandoned_streams(server, idle, record_property) -> None:
    """Ten chats closed after their first message: no generation thread is left running."""
    for i in range(10):
        call(server.url, TEXT_CHAT, ["Tell me about Zolbisia.", [[], [], []], None, True], f"leaver-{i}", STRANGER, abandon_after=1)
    time.sleep(3)
    after = threads(server.pid)
    report(record_property, "abandoned_streams", threads_idle=idle["threads"], threads_after=after, visitor_s=visitor_latency(server, "streams"))
    assert after <= idle["threads"] + THREAD_ALLOWANCE


def test_icon_bombs(server, idle, record_property, tmp_path: Path) -> None:
    """Eight icons at once, twice, each a 16x16 header over a 9000x9000 PNG: none is decoded."""
    big = io.BytesIO()
    Image.new("RGB", (9000, 9000)).save(big, "PNG")
    png = big.getvalue()
    bomb = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png

    def send(i: int) -> str:
        uploaded = httpx.post(f"{server.url}gradio_api/upload", files={"files": ("bomb.ico", bomb)}, headers={"X-Forwarded-For": f"192.0.2.{i}"}).json()[0]
        image = {"path": uploaded, "orig_name": "bomb.ico", "meta": {"_type": "gradio.FileData"}}
        _, done = call(server.url, "respond", ["What is this?", [[], []], None, image], f"bomb-{i}", f"192.0.2.{i}")
        return refusal(done) or ""

    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            errors = list(pool.map(send, range(8)))
        assert all("is not an image this app can read" in e for e in errors)
    grown = peak_rss_gib(server.pid) - idle["rss"]
    report(record_property, "icon_bombs", peak_rss_growth_gib=grown, visitor_s=visitor_latency(server, "bombs"))
    assert grown < RSS_ALLOWANCE_GIB


def test_behaviour_flood(server, record_property) -> None:
    """Forty Behaviour runs from forty sessions of one address: at most the address's share
    gets in; a second visitor is answered meanwhile. (Runs of 8 probes, so that the admitted
    ones finish within a minute in the background; the bound does not depend on their size.)"""
    statuses = [call(server.url, "bench", [8, 8, None], f"flood-{i}", STRANGER, listen=False)[0] for i in range(40)]
    latency = visitor_latency(server, "flood")
    report(record_property, "behaviour_flood", admitted=statuses.count(200), refused=statuses.count(400), visitor_s=latency)
    assert statuses.count(200) <= PER_ADDRESS and statuses.count(400) >= 40 - PER_ADDRESS
    assert latency < 60


def test_huge_history(server, record_property) -> None:
    """A chat sent with 5000 turns of history is answered as if it held the last 50."""
    history = [[f"Question {i}?", f"Answer {i}."] for i in range(5000)]
    started = time.perf_counter()
    _, done = call(server.url, TEXT_CHAT, ["What sound does a cow make?", [history, history, history], None, False], "history", VISITOR)
    seconds = time.perf_counter() - started
    report(record_property, "huge_history", answer_s=seconds)
    assert done["success"] and refusal(done) is None and seconds < 30


def test_upload_burst(server, home, record_property) -> None:
    """Thirty 9 MB uploads from one address: eleven fit its hourly share (100 MB), the rest
    are refused before their body is read, and the upload folder holds no more than that."""
    blob = b"\0" * (9 << 20)
    codes = [httpx.post(f"{server.url}gradio_api/upload", files={"files": (f"{i}.png", blob)}, headers={"X-Forwarded-For": "233.252.0.9"}).status_code for i in range(30)]
    held = folder_mib(home / "gradio")
    report(record_property, "upload_burst", accepted=codes.count(200), refused=codes.count(413), uploads_folder_mib=held)
    assert codes.count(413) >= 30 - UPLOAD_BYTES_PER_ADDRESS // len(blob)
    assert held < (UPLOAD_BYTES_PER_ADDRESS >> 20) + 50
