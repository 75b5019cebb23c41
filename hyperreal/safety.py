"""The one check every path a visitor (or a file they send) can influence passes before it touches the disk or a
loader: names are single plain components, paths stay inside their folder (symbolic links resolved), and archives
unpack within limits of size, count and compression ratio, or not at all."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import zipfile
from pathlib import Path

from .errors import HyperrealError

MAX_UNZIP_BYTES = int(os.environ.get("HYPERREAL_MAX_UNZIP_MB", "1024")) * 1024 * 1024
MAX_UNZIP_FILES = 20_000
MAX_UNZIP_RATIO = 200  # uncompressed / compressed size of one entry; images barely compress, bombs do thousands
_PLAIN = re.compile(r"[\w][\w.\- ]{0,127}")


def component(name: str, what: str) -> str:
    """``name`` as one plain file or folder name (letters, digits, '_', '-', '.', spaces; no separators, no '..')."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or ".." in name:
        raise HyperrealError(f"{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.' only")
    return name


def sanitized(text: str | None, fallback: str = "anon") -> str:
    """Any string as a plain name (for ids a visitor chooses, such as Gradio's session hash): a plain one as it is,
    any other as a digest of it, so that '../victim' can neither leave the folder nor land on 'victim'."""
    if not text:
        return fallback
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        return text
    return "h-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def as_path(text: str | Path, what: str = "path") -> Path:
    """A path a person gave, ``~`` expanded, or a clear refusal (a NUL character, an unknown ``~user``, a name too
    long for the file system) instead of the OS error each of those raises later."""
    shown = str(text)[:80] + ("..." if len(str(text)) > 80 else "")
    if "\x00" in str(text):
        raise HyperrealError(f"{what} {shown!r} contains a NUL character")
    try:
        p = Path(text).expanduser()
        p.exists()  # an over-long name fails here
    except (RuntimeError, OSError, ValueError) as e:
        raise HyperrealError(f"{what} '{shown}' is not a usable path ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0][:80] if str(e) else 'invalid'})") from None
    return p


def within(path: str | Path, *roots: str | Path, what: str = "path") -> Path:
    """``path`` resolved (symbolic links too), refused unless it is one of ``roots`` or inside one."""
    resolved = as_path(path, what).resolve()
    for root in roots:
        r = Path(root).expanduser().resolve()
        if resolved == r or r in resolved.parents:
            return resolved
    raise HyperrealError(f"{what} '{path}' is not allowed: it is outside {', '.join(map(str, roots))}")


def unzip(archive: str | Path, into: str | Path) -> Path:
    """Unpack ``archive`` into ``into`` (made empty first), within the limits above; on any refusal nothing of it
    is left behind. Returns the folder holding the data (the single top folder of a zip of one folder)."""
    archive, into = Path(archive), Path(into)
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as z:
            entries = [m for m in z.infolist() if not m.is_dir()]
            if len(entries) > MAX_UNZIP_FILES:
                raise HyperrealError(f"{archive.name} holds {len(entries):,} files; at most {MAX_UNZIP_FILES:,}")
            total = 0
            for m in entries:
                target = within(into / m.filename, into, what=f"{archive.name}: the entry")  # zip-slip
                if m.file_size > MAX_UNZIP_RATIO * max(m.compress_size, 1) and m.file_size > 1024 * 1024:
                    raise HyperrealError(f"{archive.name}: '{m.filename}' expands {m.file_size // max(m.compress_size, 1)}"
                                         " times (a zip bomb?); refusing the archive")
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):  # counted as written: a header's sizes can lie
                        total += len(chunk)
                        if total > MAX_UNZIP_BYTES:
                            raise HyperrealError(f"{archive.name} unpacks to more than {MAX_UNZIP_BYTES >> 20} MB "
                                                 "(HYPERREAL_MAX_UNZIP_MB); send fewer or smaller images")
                        dst.write(chunk)
    except zipfile.BadZipFile:
        shutil.rmtree(into, ignore_errors=True)
        raise HyperrealError(f"{archive.name} is not a readable .zip file") from None
    except (OSError, RuntimeError, NotImplementedError, ValueError, EOFError) as e:
        # entries that clash with each other (a file and a folder of one name), names too long, encrypted or
        # deflate64 entries (zipfile reads neither), damaged data
        shutil.rmtree(into, ignore_errors=True)
        raise HyperrealError(f"{archive.name} cannot be unpacked ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable entry'}); zip the images "
                             "again without a password, with plain names") from None
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    entries = [p for p in into.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into
