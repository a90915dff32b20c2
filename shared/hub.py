"""The Hugging Face Hub: datasets checked before they are loaded, and models fetched by repository id.
Torch-free and ``datasets``-free, so a training script can call it before its heavy imports.

Datasets fail at once when they cannot be had, instead of letting ``datasets`` retry for half a minute.

``require_hub_dataset`` decides before ``datasets.load_dataset`` is called:

* offline mode declared (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, read as ``datasets`` reads
  them): a copy in the ``datasets`` cache is left to ``load_dataset`` (offline it reads the cache in
  a fraction of a second); without one, a ``UserError`` right away;
* otherwise one request to the hub endpoint (``HF_ENDPOINT``), ``PROBE_TIMEOUT_S`` seconds, no
  retries. Unreachable with a cached copy: ``datasets`` and ``huggingface_hub`` are switched to
  offline mode for this process, so that ``load_dataset`` reads the cache without retrying;
  unreachable without one: a ``UserError`` right away.
"""
from __future__ import annotations

import glob
import os
import re
import threading
import warnings
from functools import lru_cache
from pathlib import Path

from .errors import UserError

PROBE_TIMEOUT_S = 3.0
# A hub repository id: owner/name (letters, digits, "-", "_", "."), as huggingface_hub validates it.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}  # datasets.config.ENV_VARS_TRUE_VALUES


def hub_offline() -> str | None:
    """The variable that declares offline mode for ``datasets``, or None when it is not declared.

    The rule of ``datasets.config``: ``HF_DATASETS_OFFLINE``, when set, wins over ``HF_HUB_OFFLINE``
    (and ``TRANSFORMERS_OFFLINE``, which ``huggingface_hub`` reads as the same switch).
    """
    from huggingface_hub import constants

    value = os.environ.get("HF_DATASETS_OFFLINE")
    if value is not None:
        return "HF_DATASETS_OFFLINE" if value.upper() in _TRUE else None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return None


def datasets_cache_dir() -> str:
    """``datasets.config.HF_DATASETS_CACHE``, without importing ``datasets`` (a second and more)."""
    from huggingface_hub import constants

    return os.path.expanduser(os.environ.get("HF_DATASETS_CACHE", os.path.join(constants.HF_HOME, "datasets")))


def _snake(name: str) -> str:
    # datasets.naming.camelcase_to_snakecase, which names the cache folder of a hub dataset
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name)
    return name.lower()


def cached_dataset_dirs(repo_id: str) -> list[str]:
    """Prepared copies of ``repo_id`` in the ``datasets`` cache: the folders that
    ``datasets.load.CachedDatasetModuleFactory`` falls back to when the hub cannot be reached."""
    parts = repo_id.split("/")
    parts[-1] = _snake(parts[-1])
    root = os.path.join(datasets_cache_dir(), "___".join(parts))
    return [p for p in glob.glob(os.path.join(glob.escape(root), "*", "*", "*")) if os.path.isdir(p)]


@lru_cache(maxsize=None)
def probe_hub(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``endpoint`` answers one HEAD request within ``timeout`` seconds, else the reason.

    The request goes through ``huggingface_hub``'s own client (its proxies and client factory), in a
    thread so that a hanging name lookup, which no socket timeout covers, cannot hold it up either.
    """
    result: list[str | None] = []

    def head() -> None:
        try:
            from huggingface_hub.utils import get_session

            status = get_session().head(endpoint, timeout=timeout, follow_redirects=False).status_code
            result.append(None if status < 500 else f"it answered HTTP {status}")
        except Exception as err:  # any failure to get an answer means the same to the user
            text = str(err).strip()
            result.append(text.splitlines()[0][:200] if text else type(err).__name__)

    thread = threading.Thread(target=head, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0] if result else f"no answer within {timeout:g} s"


def require_hub_dataset(repo_id: str, fix: str) -> None:
    """Return when ``datasets.load_dataset(repo_id)`` can work at once (see the module docstring);
    otherwise raise a one-line ``UserError`` that names ``repo_id`` and ends with ``fix``."""
    offline = hub_offline()
    if offline:
        if cached_dataset_dirs(repo_id):
            return
        raise UserError(f"could not fetch {repo_id}: offline mode is on ({offline} is set) and the datasets cache "
                        f"{datasets_cache_dir()} has no copy of it; {fix}")
    from huggingface_hub import constants

    reason = probe_hub(constants.ENDPOINT)
    if reason is None:
        return
    if cached_dataset_dirs(repo_id):
        _go_offline()
        warnings.warn(f"the hub at {constants.ENDPOINT} is unreachable ({reason}); using the cached copy of {repo_id}",
                      UserWarning, stacklevel=2)
        return
    raise UserError(f"could not fetch {repo_id}: the hub at {constants.ENDPOINT} is unreachable ({reason}); {fix}")


def _go_offline() -> None:
    """Offline mode for the rest of this process: both libraries read these flags at call time."""
    import datasets.config
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def fetch_model(repo_id: str, flag: str, required: tuple[str, ...]) -> Path:
    """The local snapshot of hub model ``repo_id`` (fetched, or from the local cache) holding the files
    ``required``; anything that fails is one UserError naming the fix."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    def fail(why: str) -> UserError:
        return UserError(f"{flag} {repo_id} is no local directory and could not be fetched from the Hugging Face "
                         f"Hub ({why}); check the path or the repository id, or fetch it where the hub is reachable")

    revision, unreachable = None, None
    if not constants.HF_HUB_OFFLINE:
        # snapshot_download resolves the revision with no timeout, so an endpoint that accepts the
        # connection and never answers would hang it: resolve it here, with the hub's metadata timeout
        # (HF_HUB_ETAG_TIMEOUT, 10 s by default).
        try:
            revision = huggingface_hub.HfApi().repo_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        except RepositoryNotFoundError:
            raise fail("no such repository, or a private or gated one: log in with `hf auth login`") from None
        except Exception as err:  # unreachable: the local cache may still hold it
            unreachable = err
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=revision is None)
    except Exception as err:  # network, cache and validation errors of an external service: one line
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set and the local hub cache does not hold it"
        else:
            why = _first_line(unreachable or err) + ", and the local hub cache does not hold it"
        raise fail(why) from None
    return _checked_snapshot(repo_id, folder, required)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _checked_snapshot(repo_id: str, folder: str, required: tuple[str, ...]) -> Path:
    path = Path(folder)
    if not all((path / name).is_file() for name in required):
        raise UserError(f"hub repository {repo_id} holds no BIVA model ({' and '.join(required)}); "
                        f"pass a repository written by scripts/export.py --push-to-hub")
    return path


def in_hub_cache(path: Path) -> bool:
    """Whether ``path`` is a snapshot folder of the local hub cache (read-only, shared)."""
    if len(path.parts) < 3 or path.parent.name != "snapshots":
        return False
    from huggingface_hub import constants

    return path.resolve().is_relative_to(Path(constants.HF_HUB_CACHE).resolve())
