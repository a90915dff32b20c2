"""Fail at once when a hub dataset cannot be had, instead of letting ``datasets`` retry for half a
minute. Torch-free and ``datasets``-free, so a training script can call it before its heavy imports.

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

from .errors import UserError

PROBE_TIMEOUT_S = 3.0
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
