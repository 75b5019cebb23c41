"""Where a named model comes from, what its file says about itself, and the per-base cache of loaded ones.

Every method names its files the same way: an embedded name (``python -m hyperreal models``), a local folder, a
``.safetensors`` file, or a hub id. :func:`resolve` turns such a name into one :class:`Source`; what a folder must
hold differs per method, so the caller passes ``pick``, which chooses inside a folder. Weights are only ever read
from safetensors: a pickled file is refused here, before any loader sees it.
"""
from __future__ import annotations

import collections
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save_file

from .errors import HyperrealError
from .registry import Artifact, embedded_artifacts, find_embedded
from .safety import as_path

# a Hugging Face repository id: owner/name, letters, digits, '-', '_' and '.', at most 96 characters each
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
OFFLINE_WORDS = ("cached locally", "outgoing traffic", "offline", "connect", "resolve", "network", "timed out",
                 "localentrynotfound")


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text or ""))


@dataclass(frozen=True)
class Source:
    how: str  # "file" | "folder" | "hub"
    where: str  # a local path, or the hub id
    artifact: Artifact | None = None  # the embedded artifact it came from, if any

    @property
    def path(self) -> Path | None:
        return None if self.how == "hub" else Path(self.where)


def resolve(source: str, kind: str, what: str, pick: Callable[[Path, str], Source], hub: bool = True,
            known: str = "") -> Source:
    """NAME | FOLDER | FILE | hub id -> a :class:`Source`, never touching the network.

    ``kind`` is the registry kind of embedded artifacts to look up; ``pick(folder, source)`` returns what to load
    from a folder (or raises); ``hub`` says whether a hub id is acceptable; ``known`` ends the error message.
    """
    if not isinstance(source, str) or not source.strip():
        raise HyperrealError(f"a {what} must be named: an embedded name, a folder, a .safetensors file"
                             + (" or a hub id" if hub else ""))
    source = source.strip()
    art = find_embedded(source, kind)
    path = art.path if art is not None else as_path(source, what)
    if path.is_dir():
        found = pick(path, source)
        return Source(found.how, found.where, art)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise HyperrealError(f"{what} '{source}': only .safetensors files are read (no pickled "
                                 ".bin/.ckpt/.pt/.pth)")
        return Source("file", str(path), art)
    if hub and is_hub_id(source):
        return Source("hub", source)
    raise HyperrealError(f"{what} '{source}' is not " + (known or "an existing file or folder"
                                                         + (", or a hub id" if hub else "")))


def single_safetensors(folder: Path, source: str, what: str) -> Source:
    """The one .safetensors file of a folder, or an error saying how many there are."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise HyperrealError(f"{what} folder '{source}' holds {len(files)} .safetensors files; name the file")
    return Source("file", str(files[0]))


def embedded_names(kind: str) -> list[str]:
    return [a.name for a in embedded_artifacts() if a.kind == kind]


def read_header(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """A .safetensors file's metadata and tensor names, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as e:
        raise HyperrealError(f"'{path}' is not a readable .safetensors file ({type(e).__name__})") from None


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Written to a temporary name and renamed: a file is whole or absent, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_error(what: str, name: str, err: Exception, hub: bool = True) -> tuple[str, str]:
    """(cause, fix) for a model that failed to load, in words a person can act on."""
    text = f"{type(err).__name__}: {err}".strip()
    low = text.lower()
    if hub and ("gated" in low or "401" in low or "403" in low):
        return "the repository is gated or private", "accept its licence on the hub and log in (`hf auth login`)"
    if hub and any(k in low for k in OFFLINE_WORDS):
        return ("it is not in the local Hugging Face cache and the hub cannot be reached (or the id is misspelt)",
                "check the id, connect to the internet once to download it, or pass a local folder")
    if hub and ("not found" in low or "404" in low or "repositorynotfound" in low or "repo id" in low
                or "hfvalidation" in low):
        return "no such model on the hub", "check the spelling of the id"
    if "safetensors" in low:
        return ("it has no safetensors weights (hyperreal never loads pickled .bin/.ckpt files)",
                f"use a repository or folder with .safetensors weights for the {what}")
    return text.splitlines()[0][:300], ""


LOAD_SECONDS = float(os.environ.get("HYPERREAL_LOAD_TIMEOUT", "300"))  # a model a job names, from the hub


def with_deadline(load: Callable[[], object], what: str, seconds: float | None = None):
    """``load()`` in a worker thread, given up after ``seconds``: a hub that accepts a connection and never answers
    (or answers a byte a minute) costs this request an error, not the whole app. The worker may go on in the
    background; huggingface_hub's own timeouts (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT) end it."""
    seconds = LOAD_SECONDS if seconds is None else seconds
    box: dict = {}

    def work():
        try:
            box["value"] = load()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    worker = threading.Thread(target=work, daemon=True, name=f"hyperreal-load {what}")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise HyperrealError(f"loading {what} took more than {seconds:g} s (the hub or the network is not answering); "
                             "try again later, or use a local file (HYPERREAL_LOAD_TIMEOUT sets the limit)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def identity(path: str | Path) -> str:
    """A cache key that changes when the file (or any file of the folder) is rewritten."""
    p = Path(path)
    if p.is_dir():
        stamp = max((f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()), default=0)
    else:
        stamp = p.stat().st_mtime_ns
    return f"{p.resolve()}@{stamp}"


class PerBaseCache:
    """Things loaded for one base (keyed weakly by an object of that base), at most ``size`` of them, least
    recently used first out; ``drop(value)`` runs for each one that leaves."""

    def __init__(self, size: int, drop: Callable[[object], None] | None = None):
        self.size, self.drop = size, drop
        self._by_owner: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # jobs prepare their models concurrently, outside the base's lock

    def entries(self, owner) -> "collections.OrderedDict":
        return self._by_owner.setdefault(owner, collections.OrderedDict())

    def get(self, owner, key: str, load: Callable[[], object]):
        with self._lock:
            entries = self.entries(owner)
            if key in entries:
                entries.move_to_end(key)
                return entries[key]
        value = load()  # outside the lock (a slow load holds up no one else); a load that fails evicts nothing
        with self._lock:
            while len(entries) >= self.size and key not in entries:
                _, old = entries.popitem(last=False)
                if self.drop is not None:
                    self.drop(old)
            entries[key] = value
            return value
