"""How much of the shared queue one client may hold.

A Space is one process that strangers share: without a bound per client, one client that sends
forty Behaviour runs from forty sessions fills the queue, and every other visitor gets "Queue is
full". So each request is counted against its session and its network address while it waits
or runs, and one over either bound is refused at once, in words, without taking a place in the
queue. The address bound is the one a script cannot dodge by inventing sessions; it is higher
than the session bound because a class behind one school router shares an address. Uploads are
bounded the same way, in bytes per address and in total.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

PER_SESSION = 3  # requests one browser tab may have waiting or running: a chat, a Fuse and a Behaviour run
PER_ADDRESS = 12  # and one network address, over all its sessions


def client_address(peer: str | None, headers: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> str:
    """The client's address: the connection's peer, or on a Hugging Face Space (``SPACE_ID``
    set), where every connection comes from the Space's proxy, the last address in
    ``X-Forwarded-For``: the one the proxy added (a proxy appends; what comes before is the
    client's own word). Elsewhere the whole header is the client's word, so not used."""
    forwarded = headers.get("x-forwarded-for", "")
    if environ.get("SPACE_ID") and forwarded.strip():
        return forwarded.split(",")[-1].strip()
    return peer or "unknown"


def refusal(held: Iterable[tuple[str, str]], session: str, address: str) -> str | None:
    """Why a new request from ``session`` at ``address`` is refused, given the (session,
    address) of every request waiting or running; None when it may join the queue."""
    held = list(held)
    if sum(s == session for s, _ in held) >= PER_SESSION:
        return f"You already have {PER_SESSION} requests waiting or running; wait for them to finish."
    if sum(a == address for _, a in held) >= PER_ADDRESS:
        return f"Your network already has {PER_ADDRESS} requests waiting or running on this server; try again when some have finished."
    return None


UPLOAD_WINDOW_SECONDS = 3600.0  # Gradio keeps an upload for up to two hours (delete_cache)
UPLOAD_BYTES_PER_ADDRESS = 100 << 20  # per address and window: ten full-size images
UPLOAD_BYTES_TOTAL = 2 << 30  # what the uploads folder may hold, all visitors together


class UploadLedger:
    """Bytes uploaded per address in the last ``UPLOAD_WINDOW_SECONDS``, and the bytes the
    uploads folder holds: an upload that would pass either bound is refused before its body is
    read, so that one client cannot fill the disk that every visitor's uploads share."""

    RESCAN_SECONDS = 30.0

    def __init__(self, folder: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder, self.clock = folder, clock
        self._sent: dict[str, list[tuple[float, int]]] = {}
        self._lock = threading.Lock()
        self._held, self._scanned = self.held(), clock()
        self._scanning = False

    def _estimate(self, now: float) -> int:
        """The folder's bytes as of the last scan plus what was admitted since; a new scan (a
        walk of every file: a second for 50,000 of them) runs in a thread of its own when the
        last is ``RESCAN_SECONDS`` old, never in the request that asks."""
        if now - self._scanned > self.RESCAN_SECONDS and not self._scanning:
            self._scanning = True

            def rescan() -> None:
                total = self.held()
                with self._lock:
                    self._held, self._scanned, self._scanning = total, self.clock(), False

            threading.Thread(target=rescan, name="uploads-scan", daemon=True).start()
        return self._held + sum(n for sent in self._sent.values() for t, n in sent if t >= self._scanned)

    def held(self) -> int:
        """Bytes in the uploads folder now (a walk of it)."""
        total = 0
        for root, _, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:  # cleaned meanwhile
                    continue
        return total

    def admit(self, address: str, nbytes: int | None) -> str | None:
        """Why an upload of ``nbytes`` (its Content-Length; None when the client sent none) from
        ``address`` is refused, or None after counting it."""
        if nbytes is None:
            return "Uploads must say their size (Content-Length) and not be sent in chunks."
        with self._lock:
            now = self.clock()
            sent = [(t, n) for t, n in self._sent.get(address, []) if now - t < UPLOAD_WINDOW_SECONDS]
            if sum(n for _, n in sent) + nbytes > UPLOAD_BYTES_PER_ADDRESS:
                self._sent[address] = sent
                return f"You have uploaded {UPLOAD_BYTES_PER_ADDRESS >> 20} MB in the last hour, this server's share per visitor; try again later."
            if self._estimate(now) + nbytes > UPLOAD_BYTES_TOTAL:
                return "The server's space for uploads is full right now; try again in a while."
            self._sent[address] = [*sent, (now, nbytes)]
            return None
