"""A merge's output directory: who builds it, where it is staged, when an existing one is served.

A merge writes gigabytes over minutes into a directory that another process may be building or
reading at the same time (two apps starting on one cache, a script re-running ``--out``), and it
may be killed at any moment. So nothing about the target is taken on trust:

- **One builder per target.** An ``fcntl.flock`` lock file beside the target: a second merge of
  the same output waits, then finds it finished and reuses it. The kernel drops the lock of a
  killed process, so a dead builder never blocks anyone.
- **Staging where rename works.** The output is assembled in a hidden ``.<name>.partial-<id>``
  directory beside the target (the same filesystem) and renamed into place. An existing empty
  target directory (a mount point cannot be renamed over) gets the staging directory inside it
  instead, and the files are moved in one by one, the recipe last.
- **No leftovers from dead processes.** Every staging directory holds an owner file (pid, host);
  a merge first removes the staging directories around its target whose owner has died.
- **On the disk before it is published.** Every file is synced (the shards as they are written,
  see ``fusion.writer.ShardFile``), then the staging directory, then the rename's directory: a
  crash of the machine leaves the old state or the whole new output, never named empty files.
- **Verified reuse.** The recipe lists every file of the finished output with its size; an
  output is reused only if all are there with those sizes, else rebuilt (see ``reusable``).
- **One line per I/O failure.** An ``OSError`` becomes a FusionError ``"PATH: reason"``, after the
  staging directory is removed.

Linux and macOS (``fcntl``). No torch here: the CLI imports this module for its JSON and error
helpers without the cost.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import IO, Any, NoReturn

from .errors import FusionError

RECIPE_FILE = "fusion_recipe.json"
OWNER_FILE = ".owner.json"
STEM_CHARS = 200  # of the target's name in the lock and staging names: with their suffixes they stay under NAME_MAX (255)

log = logging.getLogger("fusion")


# --- JSON every parser reads ----------------------------------------------------------------


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None. JSON has no NaN or Infinity:
    Python writes them as bare words that other parsers (browsers, ``jq``) reject, and NaN weights
    give NaN scores."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value: Any, *, indent: int | None = None) -> str:
    """``value`` as strict JSON (``allow_nan=False``), non-finite floats written as null."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)


def write_whole(path: Path, data: str | bytes) -> None:
    """``data`` into ``path`` whole or not at all: written beside it under a hidden name, then
    renamed over it. A failure (a full disk, a read-only mount) removes the partial file and
    raises a FusionError that names ``path``, where the system's error would name none."""
    part = path.with_name(f".{path.name}.partial")
    try:
        part.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(part, path)
    except OSError as err:
        part.unlink(missing_ok=True)
        raise FusionError(os_error_line(err, path)) from None


# --- checks before any work -----------------------------------------------------------------


def os_error_line(err: OSError, path: Path | None = None) -> str:
    """``"PATH: reason"`` for an OSError, in the system's words: all a user needs to fix a full
    disk, a read-only mount or a missing directory. ``path`` names the place as the user knows
    it, instead of the file the error names."""
    where = path or (os.fsdecode(err.filename) if err.filename else None)
    reason = err.strerror or str(err)
    return f"{where}: {reason}" if where else reason


def refuse_file_in_the_way(path: Path) -> None:
    """FusionError if ``path``, or its nearest existing ancestor, is not a directory: a file there
    means ``path`` can never be created as a directory, and mkdir's own words ("File exists",
    "Not a directory") do not say which file is at fault."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path and not path.is_dir():
        raise FusionError(f"{path}: is a file, not a directory")
    if not existing.is_dir():
        raise FusionError(f"{existing}: is a file, in the way of the directory {path}")


def writable_directory(path: Path) -> None:
    """Create ``path`` and prove that a file can be written in it, for work that takes minutes
    and only writes at the end (``python -m fusion eval --out``): a bad path fails at once."""
    probe = path / f".neuron-fusion-probe-{os.getpid()}"
    try:
        refuse_file_in_the_way(path)
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise FusionError(os_error_line(err, path)) from None


def check_target(out: Path) -> None:
    """Refuse, before any work, a target that can never hold this output: a symbolic link (its
    target may be on another filesystem, where a staging directory beside the link cannot be
    renamed, and writing through it would put gigabytes somewhere the user did not name), a
    file in the way, or a name longer than its filesystem allows (found now, not at the final
    rename). Creates the parent directories."""
    if out.is_symlink():
        raise FusionError(f"{out}: is a symbolic link (to {os.readlink(out)}); give the directory itself as the output")
    refuse_file_in_the_way(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(os.fsencode(out.name)) > os.pathconf(out.parent, "PC_NAME_MAX"):
        raise FusionError(f"{out}: {os.strerror(errno.ENAMETOOLONG)}")


# --- one builder per target -----------------------------------------------------------------


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name[:STEM_CHARS]}.lock"


def staging_prefix(out: Path) -> str:
    return f".{out.name[:STEM_CHARS]}.partial-"


def take_lock(out: Path) -> IO[str]:
    """Hold the target's lock (an exclusive ``flock``), waiting with a notice while another merge
    holds it. The holder removes the file on release, so a waiter that wakes up holding the lock
    of a removed file opens the path again: two merges never both believe they hold it."""
    path = lock_path(out)
    while True:
        handle = open(path, "a")
        held = False
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: another merge is building this output; waiting for it to finish", out)
                fcntl.flock(handle, fcntl.LOCK_EX)
            held = _same_file(handle, path)
        finally:
            if not held:
                handle.close()
        if held:
            return handle


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def release_lock(out: Path, handle: IO[str]) -> None:
    lock_path(out).unlink(missing_ok=True)  # while still held: see take_lock
    handle.close()


# --- leftovers of killed merges -------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def _abandoned(staging: Path, ours: bool) -> bool:
    """Whether a staging directory's merge is dead: its owner file names this host and a pid
    that no longer runs. One with no readable owner file is judged only if it is this target's
    (``ours``): the caller holds the target's lock, so no live merge can be creating it, while
    another target's may be between its mkdir and its owner file."""
    try:
        owner = json.loads((staging / OWNER_FILE).read_text())
        pid, host = owner["pid"], owner["host"]
    except (OSError, ValueError, TypeError, KeyError):
        return ours
    return host == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _alive(pid)


def remove_abandoned(out: Path) -> None:
    """Remove the staging directories that killed merges (SIGKILL, SIGTERM, a closed terminal:
    no ``finally`` runs) left beside ``out``, or inside it when it is an existing directory;
    otherwise each kill leaves gigabytes that nothing removes."""
    places = [out.parent, out] if out.is_dir() else [out.parent]
    for staging in (s for place in places for s in place.glob(".*.partial-*")):
        if staging.is_dir() and not staging.is_symlink() and _abandoned(staging, staging.name.startswith(staging_prefix(out))):
            log.info("removing %s, left by a merge that was killed", staging)
            shutil.rmtree(staging, ignore_errors=True)


# --- verified reuse -------------------------------------------------------------------------


def read_recipe(out: Path) -> dict[str, Any] | None:
    """The recipe of ``out``, or None if it has none that parses (not a merge output, or cut off)."""
    try:
        recipe = json.loads((out / RECIPE_FILE).read_text())
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return None
    return recipe if isinstance(recipe, dict) else None


def damage(out: Path, files: Any) -> str | None:
    """What makes a finished output unfit to serve, or None: every file its recipe records must be
    there with its recorded size. Sizes catch what kills and full disks do (a truncated or
    missing shard) without hashing gigabytes."""
    if not isinstance(files, dict) or not files:
        return f"{RECIPE_FILE} lists no files (written before outputs were verified)"
    for name, size in files.items():
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} recorded"
    return None


def reusable(out: Path, key: str, *, cached: bool) -> dict[str, Any] | None:
    """The recipe of ``out`` if it holds this very merge (same key), complete; else None, with
    ``out`` absent or an empty directory, ready to be built.

    A damaged copy of this merge (a shard truncated or deleted since) is rebuilt, with a notice:
    a cache entry whatever it holds, since the cache belongs to the library; an explicit output
    only if it holds nothing but the files it recorded, since anything else there is someone's
    (then FusionError, as for a directory holding another output)."""
    if not out.exists():
        return None
    recipe = read_recipe(out)
    same = recipe is not None and recipe.get("key") == key
    problem = damage(out, recipe.get("files")) if recipe is not None and same else None
    if same and problem is None:
        return recipe
    entries = sorted(out.iterdir())
    if not entries:
        return None
    if cached:
        log.warning("%s: %s; building it again", out, problem or "not a finished output")
        shutil.rmtree(out)
        return None
    if recipe is None or not same:
        raise FusionError(f"output directory {out} already exists and holds something else; choose another --out or remove it")
    listed = {*(recipe.get("files") or {}), RECIPE_FILE}
    if any(p.name not in listed for p in entries):
        raise FusionError(f"{out}: holds this merge, unverified ({problem}), and files its recipe does not list; remove it or choose another --out")
    log.warning("%s: holds this merge, damaged (%s); building it again", out, problem)
    for p in entries:
        p.unlink()
    return None


def sync(path: Path) -> None:
    """Flush ``path`` (a file or a directory's entries) to the disk: a published output must
    survive a crash of the machine too, and a rename is only durable once its directory is.
    A filesystem that cannot sync a directory (some network and FUSE ones) is taken at its word."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (path.is_dir() and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


# --- one merge's hold on its output ---------------------------------------------------------


class Slot:
    """One merge's hold on its output, from ``claim`` to ``publish`` or ``abandon``: the target's
    lock, the staging directory, or the recipe of an output that is already there."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.recipe: dict[str, Any] | None = None  # set when ``out`` already holds this merge
        self.staging: Path | None = None
        self._lock: IO[str] | None = None

    def _take(self, key: str, cached: bool) -> None:
        check_target(self.out)
        self._lock = take_lock(self.out)
        remove_abandoned(self.out)
        self.recipe = reusable(self.out, key, cached=cached)
        if self.recipe is None:
            self._stage()
        else:
            self._release()

    def _stage(self) -> None:
        """A new staging directory, with its owner file, on the target's filesystem: beside
        ``out``, or inside it when it is an existing (empty) directory, which may be a mount point
        and then cannot be renamed over."""
        place = self.out if self.out.is_dir() else self.out.parent
        self.staging = place / f"{staging_prefix(self.out)}{uuid.uuid4().hex[:12]}"
        self.staging.mkdir()
        (self.staging / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    def publish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write the recipe, ``record`` with every file and its size, and put the output in place:
        one rename of the staging directory, or, inside an existing directory, one rename per
        file with the recipe last, so that an output is never taken as finished before it is.
        Returns the recipe as written."""
        staging = self.staging
        assert staging is not None, "publish() after a failed claim"
        (staging / OWNER_FILE).unlink()
        recipe = {**record, "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())}}
        (staging / RECIPE_FILE).write_text(json_text(recipe, indent=2) + "\n")
        for name in [*recipe["files"], RECIPE_FILE]:  # shards are synced as written: cheap here
            sync(staging / name)
        sync(staging)
        if staging.parent == self.out:
            for name in recipe["files"]:
                os.replace(staging / name, self.out / name)
            sync(self.out)  # every file in place on the disk before the recipe says it is finished
            os.replace(staging / RECIPE_FILE, self.out / RECIPE_FILE)
            staging.rmdir()
            sync(self.out)
        else:
            os.rename(staging, self.out)
            sync(self.out.parent)
        self.staging = None
        self._release()
        return recipe

    def abandon(self, err: BaseException) -> NoReturn:
        """After a failure: remove the staging directory, release the lock, and raise ``err``
        again, an OSError as a one-line FusionError naming the path."""
        if self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._release()
        if isinstance(err, OSError):
            raise FusionError(self.explain(err)) from None
        raise err

    def explain(self, err: OSError) -> str:
        """``"PATH: reason"`` with the path as the user knows it: a staged file (which a failed copy
        names second, after its source) or the lock is named as the place in the output it was for."""
        for name in (err.filename, err.filename2):
            where = Path(os.fsdecode(name)) if name else None
            if where and self.staging and where.is_relative_to(self.staging):
                return os_error_line(err, self.out / where.relative_to(self.staging))
            if where == lock_path(self.out):
                return os_error_line(err, self.out)
        return os_error_line(err, None if err.filename else self.out)

    def _release(self) -> None:
        if self._lock:
            release_lock(self.out, self._lock)
            self._lock = None


def claim(out: Path, key: str, *, cached: bool) -> Slot:
    """Take ``out`` for the merge ``key``: check it, lock it, remove what killed merges left
    there, and either find it already holding this merge (``slot.recipe``; the lock is released
    at once) or stage a new output (``slot.staging``; held until ``publish`` or ``abandon``).
    ``cached``: ``out`` is a cache entry, which the library may rebuild whatever it holds.
    Every failure is a one-line FusionError, with nothing left behind."""
    slot = Slot(Path(os.path.abspath(out)))
    try:
        slot._take(key, cached)
    except BaseException as err:
        slot.abandon(err)
    return slot
