"""Turn Hugging Face Hub access failures into one message that says what to do.

FLUX.1-dev is gated: until you accept its licence and log in, every download fails deep inside transformers or
diffusers with a long traceback that wraps huggingface_hub's real error. Wrap any loading call:

    pipe = friendly_load(lambda: FluxPipeline.from_pretrained(model_id, ...), model_id)
    with hub_errors(model_id):
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")

and a GatedRepoError / RepositoryNotFoundError / LocalEntryNotFoundError (or an offline error) anywhere in the
exception chain becomes a HubAccessError (a FluxnbError) naming the repo, how to log in and where to accept the
licence. Other errors pass through untouched.

When the Hub cannot be reached, the block runs in huggingface_hub's offline mode: what is cached loads, what is
not fails at once. Otherwise huggingface_hub retries every file it cannot fetch five times, 23 s apart in all,
before it looks in the cache: `embed` printed 12 "Retrying in Ns" lines over a minute before its message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import FluxnbError

T = TypeVar("T")

LOGIN_HOWTO = ("log in with a token that can read it: in a notebook run `from huggingface_hub import notebook_login; "
               "notebook_login()`, in a terminal `hf auth login` (or set HF_TOKEN)")


class HubAccessError(FluxnbError, OSError):
    """The Hub refused or could not be reached for a repo: the message says how to get access."""


def repo_url(repo_id: str, repo_type: str = "model") -> str:
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    return f"https://huggingface.co/{prefix}{repo_id}"


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The error and everything it was raised from (transformers and diffusers wrap hub errors in OSError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def explain(err: BaseException, repo_id: str, repo_type: str = "model") -> str | None:
    """The user-facing message for a hub access failure somewhere in `err`'s chain, or None if there is none."""
    url = repo_url(repo_id, repo_type)
    for e in _chain(err):
        if isinstance(e, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
            return (f"{repo_id} is a gated repository and this account has no access yet. Accept its licence at "
                    f"{url} (logged in to the website), then {LOGIN_HOWTO}, and run this step again.")
        if isinstance(e, RevisionNotFoundError):
            return f"{repo_id} has no revision by that name: check the revision at {url}/tree/main."
        if isinstance(e, RepositoryNotFoundError):
            return (f"{repo_id} was not found on the Hub, or it is private/gated and you are not logged in. Check "
                    f"the name at {url}; if it is right, {LOGIN_HOWTO} (for a gated repo accept its licence there "
                    "first).")
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return (f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (no network, "
                    "or HF_HUB_OFFLINE=1 is set). Connect to the internet and run this step again, or point to a "
                    "local copy (a folder in diffusers layout).")
        if isinstance(e, HFValidationError):
            return (f"{repo_id!r} is neither an existing local folder nor a valid Hub id (user/name): check the "
                    "spelling or the path.")
    return None


PROBE_TIMEOUT = 5.0  # seconds the Hub has to answer at all; a reachable Hub answers in well under one
_PROBE_MEMORY = 60.0  # seconds a probe's answer is kept: a notebook kernel may outlive a network outage
_probed: dict[str, tuple[float, bool]] = {}  # Hub endpoint -> (when, reachable)


def hub_reachable() -> bool:
    """Whether the Hub answers one request (any HTTP status: a refusal is an answer); False at once when
    HF_HUB_OFFLINE is set. One attempt, no retries: remembered for a minute."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False
    when, reachable = _probed.get(constants.ENDPOINT, (float("-inf"), True))
    if time.monotonic() - when > _PROBE_MEMORY:
        try:
            get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)
            reachable = True
        except Exception:  # no DNS, no route, a proxy or firewall, a timeout: all mean "not from here"
            reachable = False
        _probed[constants.ENDPOINT] = (time.monotonic(), reachable)
    return reachable


@contextlib.contextmanager
def offline_unless_reachable(repo_id: str) -> Iterator[None]:
    """The block in huggingface_hub's offline mode when `repo_id` is no local folder and the Hub cannot be
    reached: cached files load, a missing one raises LocalEntryNotFoundError at once instead of after retries."""
    from huggingface_hub import constants

    if Path(repo_id).expanduser().exists() or hub_reachable():
        yield
        return
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # what HF_HUB_OFFLINE=1 sets; huggingface_hub reads it at every request
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


@contextlib.contextmanager
def hub_errors(repo_id: str, repo_type: str = "model") -> Iterator[None]:
    """Re-raise hub access failures inside the block as HubAccessError with a what-to-do message; an unreachable
    Hub fails at once (offline_unless_reachable)."""
    try:
        with offline_unless_reachable(repo_id):
            yield
    except FluxnbError:
        raise
    except Exception as err:
        message = explain(err, repo_id, repo_type)
        if message is None:
            raise
        raise HubAccessError(message) from err


def friendly_load(fn: Callable[[], T], repo_id: str, repo_type: str = "model") -> T:
    """`fn()`, with hub access failures turned into a HubAccessError that says how to log in / get access."""
    with hub_errors(repo_id, repo_type):
        return fn()
