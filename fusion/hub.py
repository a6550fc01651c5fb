"""Publishing a finished merge on the Hugging Face Hub: the repository created if needed, the
whole output folder uploaded as one commit, through ``huggingface_hub`` (the token from
``HF_TOKEN`` or ``hf auth login``, the Hub from ``HF_ENDPOINT``).

Only an output that is whole is pushed: its recipe lists every file with its size, and all of
them must be there (``fusion.output.damage``), so a failed or cut-off merge pushes nothing. A
Hub that cannot be reached, a token without the rights, or a name the Hub refuses is one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FusionError
from .output import RECIPE_FILE, damage, read_recipe


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _explain(err: Exception, repo: str) -> str:
    """One line for what the Hub (or the way to it) answered."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot push {repo}: HF_HUB_OFFLINE is set (unset it to reach the Hub)"
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            return f"the Hub refused the token while pushing {repo} (HTTP 401): log in with `hf auth login` or set HF_TOKEN"
        if status == 403:
            return f"the token may not create or write {repo} (HTTP 403): use a token with write access to that namespace"
        first = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
        return f"the Hub answered HTTP {status} while pushing {repo}: {first[:200]}"
    return f"the Hub at {_endpoint()} could not be reached while pushing {repo} ({type(err).__name__}: {str(err)[:200] or 'no detail'})"


def _transport(err: Exception) -> bool:
    """Whether ``err`` is the HTTP client's own (a refused connection, a timeout, a broken TLS):
    huggingface_hub's HTTP library has changed (``httpx``, now ``httpx2``), so it is known by
    its module rather than imported."""
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2") for c in type(err).__mro__)


def check_repo_name(repo: str) -> None:
    """A FusionError unless ``repo`` is a name the Hub takes: checked before a merge's minutes."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise FusionError(f"{repo!r} is not a Hub repository name (owner/name: letters, digits, '-', '_', '.')") from None
    if "/" not in repo:
        raise FusionError(f"{repo!r}: name the repository with its owner, as owner/name")


def push(out: Path, repo: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload the merge output ``out`` to the model repository ``repo`` (created, ``private``
    if asked, when it does not exist) as one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_name(repo)
    recipe = read_recipe(out)
    if recipe is None or not isinstance(recipe.get("files"), dict):
        raise FusionError(f"{out}: not a finished merge output (no readable {RECIPE_FILE}); nothing pushed")
    problem = damage(out, recipe["files"])
    if problem:
        raise FusionError(f"{out}: {problem}; nothing pushed")
    names = [*recipe["files"], RECIPE_FILE]
    api = HfApi(endpoint=_endpoint(), token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(out / name)) for name in names]  # local checks, before any request
    try:
        api.create_repo(repo, private=True if private else None, exist_ok=True)  # None: the Hub's default for a new repository
        info = api.create_commit(repo, operations=operations, commit_message=f"Neuron-Fusion merge ({recipe.get('method')}), {len(names)} files")
    except Exception as err:
        if isinstance(err, (HfHubHTTPError, ConnectionError, TimeoutError)) or _transport(err):
            raise FusionError(_explain(err, repo)) from None
        if isinstance(err, ValueError):  # an answer the client could not read: not the Hub, or a changed one
            raise FusionError(f"the Hub at {_endpoint()} gave an answer huggingface_hub could not read while pushing {repo}: {str(err)[:200]}") from None
        raise
    return str(info.commit_url)
