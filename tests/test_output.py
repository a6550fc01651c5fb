"""``fusion.output`` in small pieces: strict JSON, which staging directories count as abandoned,
and the target's lock. The same behaviour end to end, through ``fuse`` and the CLI, is in
test_merge.py and test_cli.py."""

import errno
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fusion import output
from fusion.output import OWNER_FILE, json_text, lock_path, release_lock, remove_abandoned, take_lock


def test_json_text_writes_non_finite_floats_as_null():
    report = {"kinds": [{"quantiles": {"0.5": float("nan"), "1.0": float("inf")}, "curve": [[1, -float("inf")], (2, 0.5)]}], "n": 3}
    text = json_text(report)
    assert json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} is not JSON")) == {
        "kinds": [{"quantiles": {"0.5": None, "1.0": None}, "curve": [[1, None], [2, 0.5]]}],
        "n": 3,
    }


def staged(place, name: str, owner: dict | None):
    directory = place / name
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"x" * 100)
    if owner is not None:
        (directory / OWNER_FILE).write_text(json.dumps(owner))
    return directory


def test_only_staging_directories_of_dead_merges_are_removed(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    here = socket.gethostname()
    out = tmp_path / "out"
    removed = [
        staged(tmp_path, ".out.partial-dead", {"pid": dead, "host": here}),
        staged(tmp_path, ".other.partial-dead", {"pid": dead, "host": here}),  # another target's, dead too
        staged(tmp_path, ".out.partial-noowner", None),  # ours, killed before its owner file was written
    ]
    kept = [
        staged(tmp_path, ".out.partial-live", {"pid": os.getpid(), "host": here}),
        staged(tmp_path, ".out.partial-elsewhere", {"pid": dead, "host": here + "-other"}),  # cannot tell from here
        staged(tmp_path, ".other.partial-noowner", None),  # another target's, maybe being created right now
    ]
    remove_abandoned(out)
    assert [d.exists() for d in removed] == [False] * 3 and [d.exists() for d in kept] == [True] * 3


def test_lock_is_exclusive_and_leaves_no_file(tmp_path):
    out = tmp_path / "out"
    first = take_lock(out)
    with open(lock_path(out)) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    got = []
    waiter = threading.Thread(target=lambda: got.append(take_lock(out)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # waiting for the first holder
    release_lock(out, first)
    waiter.join(10)
    assert got and os.fstat(got[0].fileno()).st_ino == lock_path(out).stat().st_ino  # holds the file now at the path
    release_lock(out, got[0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("in_place", [False, True])
def test_an_output_is_on_the_disk_before_it_is_published(tmp_path, monkeypatch, in_place):
    """Every file, the staging directory and the directory the output lands in are synced, and
    in an existing (mount point) directory the recipe is put in place only after the shards are
    on the disk there: a crash of the machine never leaves a recipe naming missing files."""
    events = []
    monkeypatch.setattr(output, "sync", lambda path: events.append(("sync", path)))
    real_replace = os.replace
    monkeypatch.setattr(output.os, "replace", lambda src, dst: events.append(("place", Path(dst).name)) or real_replace(src, dst))
    out = tmp_path / "fused"
    if in_place:
        out.mkdir()
    slot = output.claim(out, "key", cached=False)
    (slot.staging / "model.safetensors").write_bytes(b"x" * 10)
    staging = slot.staging
    slot.publish({"key": "key"})
    synced = [path for kind, path in events if kind == "sync"]
    assert staging / "model.safetensors" in synced and staging / output.RECIPE_FILE in synced and staging in synced
    if in_place:
        placed = [e for e in events if e[0] == "place"]
        assert placed == [("place", "model.safetensors"), ("place", output.RECIPE_FILE)]
        shard, recipe = events.index(placed[0]), events.index(placed[1])
        assert ("sync", out) in events[shard:recipe] and events[-1] == ("sync", out)
    else:
        assert events[-1] == ("sync", tmp_path)
    assert json.loads((out / output.RECIPE_FILE).read_text())["files"] == {"model.safetensors": 10}


def test_a_directory_that_cannot_be_synced_is_taken_at_its_word(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(output.os, "fsync", refuse)
    output.sync(tmp_path)  # a directory: fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError):
        output.sync(tmp_path / "f")  # a file that cannot be synced is an error


def test_a_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A full disk while writing results.json leaves the previous one as it was, no partial
    file, and an error that names the file (the system's ENOSPC names none)."""
    from fusion.errors import FusionError
    from fusion.output import write_whole

    target = tmp_path / "results.json"
    write_whole(target, "old")
    real = Path.write_bytes

    def full(self, data):
        real(self, data[:2])  # a part got written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(FusionError, match=f"^{re.escape(str(target))}: No space left on device$"):
        write_whole(target, "new results")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
