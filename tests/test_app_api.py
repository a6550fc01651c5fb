"""The running app through its named API endpoints, as gradio_client users see it."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from conftest import queue_call, refusal
from fusion.detectors import detect
from fusion.presets import ASSETS, get_preset, probe_path
from fusion.probes import load_probes

LOAD_REQUESTS = 20


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


def question() -> str:
    return load_probes(probe_path(get_preset("pocket")))[0][0].question


def check_answers(result: dict, *, image: bool) -> None:
    """Each model answered, and its labels are the detectors' on its answer in its prompt's
    context (an image prompt never carries Context-Hallucination)."""
    assert result["preset"] == "pocket"
    for key in ("original", "fused"):
        record = result[key]
        assert isinstance(record["answer"], str) and record["answer"]
        expected = detect(record["answer"], prompt_has_image=image)
        assert record["labels"] == [m.label for m in expected]
        assert [m["text"] for m in record["matches"]] == [m.text for m in expected]
        assert not image or "context_hallucination" not in record["labels"]
    assert result["original"]["model"] != result["fused"]["model"]


def test_ready_quickly(app) -> None:
    print(f"start to ready: {app.ready_seconds:.1f} s")
    assert app.ready_seconds < 120


def test_compare_text(client: Client) -> None:
    check_answers(client.predict(question(), api_name="/compare_text"), image=False)


def test_compare_image(client: Client) -> None:
    result = client.predict(handle_file(str(ASSETS / "examples" / "cat.jpg")), "Is there a dog in the image?", api_name="/compare_image")
    check_answers(result, image=True)


@pytest.mark.parametrize(
    ("args", "api", "says"),
    [
        (("  ",), "/compare_text", "message is empty"),
        (("x" * 5000,), "/compare_text", "limit is"),
        ((handle_file(str(Path(__file__))), "What is this?"), "/compare_image", "not an image"),
    ],
)
def test_bad_input_is_explained(client: Client, args: tuple, api: str, says: str) -> None:
    with pytest.raises(Exception, match=says):
        client.predict(*args, api_name=api)


def test_concurrent_load(client: Client, app, record_property) -> None:
    """20 requests at once from one session: each is answered, told the queue is full, or
    refused at the door as over the session's share (``studio.clients``: HTTP 400 from
    ``queue/join``, whose reason gradio_client does not show); the app keeps serving."""
    start = time.perf_counter()

    def ask(i: int) -> tuple[str, float]:
        try:
            check_answers(client.predict(f"{question()} ({i})", api_name="/compare_text"), image=False)
            return "answered", time.perf_counter() - start
        except Exception as err:  # only a clear "queue is full" or the share's refusal is acceptable
            said = str(err).lower()
            assert ("queue" in said and "full" in said) or ("400" in said and "queue/join" in said), err
            return "refused", time.perf_counter() - start

    with ThreadPoolExecutor(LOAD_REQUESTS) as pool:
        outcomes = list(pool.map(ask, range(LOAD_REQUESTS)))
    last = max(t for _, t in outcomes)
    answered = sum(o == "answered" for o, _ in outcomes)
    print(f"load test: {answered}/{LOAD_REQUESTS} answered, last answer after {last:.1f} s")
    record_property("load_test_last_answer_s", round(last, 2))
    assert answered >= 1
    check_answers(client.predict(question(), api_name="/compare_text"), image=False)


def fuse_values(method: str, **values: object) -> list:
    """The Fuse handler's inputs: the method, then every control's value in the app's order."""
    from studio.view import all_params

    return [method, *(values.get(p.name, p.default) for p in all_params())]


def test_one_visitors_fuse_changes_nobody_elses_model(app) -> None:
    first, second = Client(app.url, verbose=False), Client(app.url, verbose=False)
    done = queue_call(app.url, "refuse", fuse_values("ties", density=0.5), session="visitor-a")
    assert done["success"], done
    assert "Fused with **ties**" in json.dumps(done["output"]["data"])
    refused = queue_call(app.url, "refuse", fuse_values("neu-p-taska", suppress=float("nan")), session="visitor-a")
    assert "suppress" in (refusal(refused) or "")
    unknown = queue_call(app.url, "refuse", fuse_values("../../etc/passwd"), session="visitor-a")
    assert re.search(r"Unknown method|not in the list of choices", refusal(unknown) or "")
    for hostile in ([], None, 7):  # each refused in the project's words, never Python's ("unhashable type")
        odd = queue_call(app.url, "refuse", fuse_values(hostile), session="visitor-a")
        assert re.search(r"Unknown method|not in the list of choices", refusal(odd) or ""), odd
    for client in (first, second):
        result = client.predict(question(), api_name="/compare_text")
        assert result["method"] == "neu-p-taska"
        assert result["fused"]["model"] == "Pocket-LLaVA + Neuron-Fusion (neu-p-taska)" and result["fused"]["answer"]


def peak_rss_gib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def test_a_thin_image_is_refused_quickly_in_little_memory(client: Client, app, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (1, 100_000)).save(tmp_path / "strip.png")
    before, start = peak_rss_gib(app.pid), time.perf_counter()
    with pytest.raises(Exception, match="long side"):
        client.predict(handle_file(str(tmp_path / "strip.png")), "What is this?", api_name="/compare_image")
    seconds, grown = time.perf_counter() - start, peak_rss_gib(app.pid) - before
    print(f"\n1x100000 image: refused in {seconds:.2f} s, peak memory grew {grown * 1024:.0f} MiB")
    assert seconds < 5 and grown < 0.5


def test_the_image_input_opens_nothing_and_refuses_data_urls(tmp_path: Path) -> None:
    """The chat's image input as a hostile client feeds it: a data: URL (which Gradio would
    decode before any check) and an icon holding a 9000×9000 PNG are refused in one line (the
    handler says it, ``Refused``); a
    picture passes through as its path, unopened (the handler decodes it once)."""
    from gradio.data_classes import ImageData
    from PIL import Image
    from test_studio import ico_holding

    import app as app_module

    box = app_module.checked_image()
    inline = box.preprocess(ImageData(url="data:image/png;base64,iVBORw0KGgo="))
    assert isinstance(inline, app_module.Refused) and inline.why == "Images are accepted as uploaded files, not as data: URLs."
    big = BytesIO()
    Image.new("L", (9000, 9000)).save(big, "PNG")
    (tmp_path / "bomb.ico").write_bytes(ico_holding(big.getvalue()))
    refused = box.preprocess(ImageData(path=str(tmp_path / "bomb.ico"), orig_name="bomb.ico"))
    assert isinstance(refused, app_module.Refused) and "not an image this app can read" in refused.why
    assert str(tmp_path) not in refused.why  # no server path
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    assert box.preprocess(ImageData(path=str(tmp_path / "ok.png"), orig_name="ok.png")) == str(tmp_path / "ok.png")
    assert box.preprocess(None) is None


def test_hostile_image_uploads_are_refused_unopened(app, tmp_path: Path) -> None:
    """Over raw HTTP, as a hostile client sends them to the image chat: an icon holding a
    9000×9000 RGB PNG (243 MB decoded) and a data: URL, each refused in one line, and the
    server's peak memory does not move."""
    import httpx
    from PIL import Image
    from test_studio import ico_holding

    big = BytesIO()
    Image.new("RGB", (9000, 9000)).save(big, "PNG")
    (tmp_path / "bomb.ico").write_bytes(ico_holding(big.getvalue()))
    before = peak_rss_gib(app.pid)
    with open(tmp_path / "bomb.ico", "rb") as f:
        uploaded = httpx.post(f"{app.url}gradio_api/upload", files={"files": ("bomb.ico", f)}).json()[0]
    sent = {"bomb.ico": {"path": uploaded, "orig_name": "bomb.ico", "meta": {"_type": "gradio.FileData"}}, "data: URL": {"url": "data:image/png;base64,iVBORw0KGgo=", "meta": {"_type": "gradio.FileData"}}}
    for name, image in sent.items():
        done = queue_call(app.url, "respond", ["What is this?", [[], []], None, image], session=f"hostile-{len(name)}")
        assert re.fullmatch(r"The upload 'bomb\.ico' is not an image this app can read \(\w+\); send a PNG, JPEG, WebP, GIF or BMP\.|Images are accepted as uploaded files, not as data: URLs\.", refusal(done) or ""), name
    assert peak_rss_gib(app.pid) - before < 0.1


def test_no_server_path_or_internal_message_reaches_a_visitor(app, tmp_path: Path) -> None:
    """A truncated JPEG in the image chat (decoded, it fails inside Pillow) and a relative path
    sent to /compare_image (Gradio refuses it before the handler runs, naming the working
    directory) each come back as one line that names no server path and no exception text."""
    import httpx
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    with open(tmp_path / "truncated.jpg", "rb") as f:
        uploaded = httpx.post(f"{app.url}gradio_api/upload", files={"files": ("truncated.jpg", f)}).json()[0]
    image = {"path": uploaded, "orig_name": "truncated.jpg", "meta": {"_type": "gradio.FileData"}}
    replies = [
        queue_call(app.url, "respond", ["What is this?", [[], []], None, image], session="paths-a"),
        queue_call(app.url, "compare_image", [{"path": "README.md", "meta": {"_type": "gradio.FileData"}}, "What is this?"], session="paths-b"),
    ]
    root = str(Path(__file__).resolve().parent.parent)
    for done in replies:
        error = refusal(done)
        assert error is not None and "/" not in error.replace("data: URLs", "") and root not in json.dumps(done) and "Traceback" not in json.dumps(done), done
    assert "truncated.jpg' is not an image this app can read" in refusal(replies[0])
    inline = queue_call(app.url, "compare_image", [{"url": "data:image/png;base64,iVBORw0KGgo=", "meta": {"_type": "gradio.FileData"}}, "What is this?"], session="paths-c")
    assert not inline["success"] and inline["output"]["error"] == "Images are accepted as uploaded files, not as data: URLs."


def probe_counts_of_pocket() -> tuple[int, int]:
    from studio.behaviour import probe_counts

    return probe_counts(get_preset("pocket"))


def _join(url: str, api_name: str, data: list, session: str) -> tuple[int, dict]:
    """``POST /gradio_api/queue/join`` as a raw client: the HTTP status and the JSON reply."""
    import urllib.error

    with urllib.request.urlopen(f"{url}config", timeout=10) as r:
        dependencies = json.load(r)["dependencies"]
    fn_index = next(i for i, d in enumerate(dependencies) if d.get("api_name") == api_name)
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}).encode()
    request = urllib.request.Request(f"{url}gradio_api/queue/join", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_one_client_cannot_fill_the_queue(tmp_path: Path) -> None:
    """A client that queues long Behaviour runs gets its session's share (3), then one line
    per extra request, without taking a place; scripts that invent a session per request stop
    at the address's share (12); pages still load, and a question is answered while the
    Behaviour runs are queued (they have a slot of their own). (Another address's requests are counted
    apart: ``test_studio``'s client tests, as loopback has one address.)"""
    from conftest import running_app
    from studio.clients import PER_ADDRESS, PER_SESSION

    with running_app(tmp_path, args=["--queue-size", "64", "--concurrency", "1"]) as app:
        long_run = [*probe_counts_of_pocket(), None]
        accepted = [_join(app.url, "bench", long_run, "greedy")[0] for _ in range(PER_SESSION)]
        status, reply = _join(app.url, "bench", long_run, "greedy")
        assert accepted == [200] * PER_SESSION and status == 400 and reply["detail"] == f"You already have {PER_SESSION} requests waiting or running; wait for them to finish."
        start = time.perf_counter()  # the Behaviour runs have a slot of their own: a question is answered meanwhile
        assert queue_call(app.url, "compare_text", [question()], session="another-tab", timeout=60)["success"]
        print(f"a question answered in {time.perf_counter() - start:.1f} s behind {PER_SESSION} full Behaviour runs")
        for i in range(PER_ADDRESS - PER_SESSION):
            assert _join(app.url, "bench", long_run, f"script-{i}")[0] == 200
        status, reply = _join(app.url, "bench", long_run, "script-extra")
        assert status == 400 and "Your network already has 12 requests" in reply["detail"]
        with urllib.request.urlopen(app.url, timeout=10) as page:  # a page (and its load event) is not queued
            assert page.status == 200
        loads = [d for d in json.loads(urllib.request.urlopen(f"{app.url}config", timeout=10).read())["dependencies"] if d["targets"] and d["targets"][0][1] == "load"]
        assert loads and all(d["queue"] is False for d in loads)


def test_an_upload_over_the_share_is_refused_before_its_body_is_read(app) -> None:
    """A client that announces more than its hourly share (100 MB) gets HTTP 413 and one line
    at once: the server reads none of the body (none is sent here)."""
    import http.client
    from urllib.parse import urlparse

    from studio.clients import UPLOAD_BYTES_PER_ADDRESS

    where = urlparse(app.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    connection.putrequest("POST", "/gradio_api/upload")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(UPLOAD_BYTES_PER_ADDRESS + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and response.read().decode() == "You have uploaded 100 MB in the last hour, this server's share per visitor; try again later."
    chunked = http.client.HTTPConnection(where.hostname, where.port, timeout=10)  # a Content-Length that chunks would override
    chunked.putrequest("POST", "/gradio_api/upload")
    chunked.putheader("Content-Type", "multipart/form-data; boundary=x")
    chunked.putheader("Content-Length", "1")
    chunked.putheader("Transfer-Encoding", "chunked")
    chunked.endheaders()
    response = chunked.getresponse()
    assert response.status == 413 and "not be sent in chunks" in response.read().decode()


def test_the_queue_share_counts_every_event_until_gradio_drops_it() -> None:
    """Events whose client closed its heartbeat stay queued (and run), so they still count;
    a file Gradio would fetch from a link is refused before it is fetched."""
    import asyncio
    from types import SimpleNamespace

    import app as app_module
    from studio.clients import PER_SESSION

    def request(host: str) -> SimpleNamespace:
        return SimpleNamespace(client=SimpleNamespace(host=host), headers={})

    admitted = []

    async def push(body, request, username):
        admitted.append(body.session_hash)
        return True, "event", "success"

    held = {str(i): SimpleNamespace(session_hash="tab", request=request("10.1.1.1"), closed=True) for i in range(PER_SESSION)}
    demo = SimpleNamespace(_queue=SimpleNamespace(push=push, event_ids_to_events=held))
    app_module.bound_clients(demo)
    refused = asyncio.run(demo._queue.push(body=SimpleNamespace(session_hash="tab", data=["hi"]), request=request("10.1.1.1"), username=None))
    assert refused[0] is False and "You already have" in refused[1] and admitted == []
    linked = {"path": "https://attacker.example/huge.png", "meta": {"_type": "gradio.FileData"}}
    refused = asyncio.run(demo._queue.push(body=SimpleNamespace(session_hash="other", data=[linked, "q"]), request=request("10.2.2.2"), username=None))
    assert refused == (False, "Files are accepted as uploads to this server, not as links to elsewhere.", "error")
    assert asyncio.run(demo._queue.push(body=SimpleNamespace(session_hash="other", data=["q"]), request=request("10.2.2.2"), username=None))[0]
