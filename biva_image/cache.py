"""The image cache: each source's converted uint8 arrays, fingerprinted, with meta.json, saved atomically.

``<cache_dir>/<dataset>-v<CACHE_VERSION>[-<hash of data_dir>]/`` (``cache_dir`` default
``~/.cache/biva/images``, under ``XDG_CACHE_HOME`` when set) holds ``train.npy``, ``test.npy`` ... and
``<split>_labels.npy`` written atomically, and a ``meta.json`` written last; a second load reads it
without touching ``datasets``. A cache built from ``data_dir`` is rebuilt when the files there change
(names, sizes, modification times). Under several processes, let the main process load first so that
only it converts.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from shared.errors import UserError

from .sources import walk_files

# Bump when a conversion recipe changes, so that old caches are rebuilt rather than reused.
CACHE_VERSION = 1


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "biva" / "images"


def cache_folder(dataset: str, data_dir: Path | None, cache_dir: str | None) -> Path:
    key = f"{dataset}-v{CACHE_VERSION}"
    if data_dir is not None:
        key += "-" + hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return cache_root(cache_dir) / key


def fingerprint(data_dir: Path | None) -> str | None:
    """Hash of the names, sizes and modification times of the files under ``data_dir``.

    A cache built from a folder is rebuilt when the folder changes (files added, removed, rewritten).
    """
    if data_dir is None:
        return None
    digest = hashlib.sha1()
    for path in walk_files(data_dir):
        stat = path.stat()
        digest.update(f"{path.relative_to(data_dir).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_meta(folder: Path, fingerprint: str | None) -> dict | None:
    """The cache's meta.json when it is of this version and fingerprint and every array is there, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
        return None
    for split, info in meta.get("splits", {}).items():
        names = [f"{split}.npy"] + ([f"{split}_labels.npy"] if info.get("labels") else [])
        if not all((folder / name).is_file() for name in names):
            return None
    return meta


def cached_meta(dataset: str, data_dir: Path | None, cache_dir: str | None) -> dict | None:
    """meta.json of a valid cache of this source (its "shape", "splits"), or None: nothing is converted."""
    return read_meta(cache_folder(dataset, data_dir, cache_dir), fingerprint(data_dir))


def load_cached(dataset: str, data_dir: Path | None, cache_dir: str | None, convert: Callable[[], dict]) -> dict:
    """{split: (images, labels | None)} of the source, read from the cache, or ``convert()``-ed and cached."""
    folder = cache_folder(dataset, data_dir, cache_dir)
    stamp = fingerprint(data_dir)
    meta = read_meta(folder, stamp)
    if meta is not None:
        parts = {}
        for split, info in meta["splits"].items():
            labels = np.load(folder / f"{split}_labels.npy") if info["labels"] else None
            parts[split] = (np.load(folder / f"{split}.npy"), labels)
        return parts
    parts = convert()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # arrays and meta must never disagree
        for split, (images, labels) in parts.items():
            save_atomic(folder / f"{split}.npy", lambda f, a=images: np.save(f, a))
            if labels is not None:
                save_atomic(folder / f"{split}_labels.npy", lambda f, a=labels: np.save(f, a))
        shape = next(iter(parts.values()))[0].shape[1:]
        meta = {"version": CACHE_VERSION, "dataset": dataset, "data_dir": str(data_dir) if data_dir else None,
                "fingerprint": stamp, "shape": list(shape),
                "splits": {split: {"n": len(images), "labels": labels is not None}
                           for split, (images, labels) in parts.items()}}
        save_atomic(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as err:
        raise UserError(f"could not write the image cache in {folder} ({err.strerror or err}); "
                        "set the cache folder (cache_dir) to a writable place") from None
    return parts


def save_atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
