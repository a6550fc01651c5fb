"""How much of the shared queue one client may hold.

A Space is one process that strangers share: without a bound per client, one client that sends
forty Behaviour runs from forty sessions fills the queue, and every other visitor gets "Queue is
full". So each request is counted against its session and its network address while it waits
or runs, and one over either bound is refused at once, in words, without taking a place in the
queue. The address bound is the one a script cannot dodge by inventing sessions; it is higher
than the session bound because a class behind one school router shares an address.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

PER_SESSION = 3  # requests one browser tab may have waiting or running: a chat, a Fuse and a Behaviour run
PER_ADDRESS = 12  # and one network address, over all its sessions


def client_address(peer: str | None, headers: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> str:
    """The client's address: the connection's peer, or on a Hugging Face Space (``SPACE_ID``
    set), where every connection comes from the Space's proxy, the first address the proxy
    puts in ``X-Forwarded-For``. Elsewhere that header is the client's own word, so not used."""
    forwarded = headers.get("x-forwarded-for", "")
    if environ.get("SPACE_ID") and forwarded.strip():
        return forwarded.split(",")[0].strip()
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
