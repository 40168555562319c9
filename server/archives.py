"""Safe extraction of data set archives (zip, tar, tar.gz) uploaded to ``POST /v1/datasets``.

Every entry is checked before a byte of it is written:

* names: no absolute paths (``/x``, ``C:/x``), no ``..``, no NUL bytes (zip-slip);
* types: plain files and folders only; symlinks, hardlinks, devices, FIFOs and sparse files are refused;
* content: image files only (the extensions :func:`inco_core.files.scan` reads); hidden files and
  ``__MACOSX/`` folders are left out silently;
* limits: at most ``max_files`` entries, at most ``max_bytes`` uncompressed in all (counted while
  writing, not taken from the headers), and no entry over 1 MiB that a zip compresses more than
  :data:`MAX_RATIO` times (a zip bomb).

Refused names are collected and reported together (the first :data:`NAMES_SHOWN` of each kind), so
one answer tells the user everything to fix. Nothing here deletes the destination on failure: the
caller extracts into a temporary folder and removes it.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from inco_core.errors import ConfigError
from server.errors import TooLarge

ARCHIVE_TYPES: dict[str, str] = {
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "application/x-tar": "tar",
    "application/gzip": "tar.gz",
    "application/x-gzip": "tar.gz",
    "application/x-compressed-tar": "tar.gz",
}
MAX_RATIO = 100  # uncompressed / compressed size of one zip entry
RATIO_FLOOR = 1 << 20  # entries smaller than this may compress as much as they like
UNPACK_FACTOR = 4  # total uncompressed size: at most this x the upload limit
NAMES_SHOWN = 20
CHUNK = 1 << 20
MAX_READ = 16 << 20  # one read from a tar stream: a header (file data is read in CHUNKs)
_DRIVE = re.compile(r"^[A-Za-z]:")


def archive_kind(content_type: str | None) -> str | None:
    """``zip``, ``tar`` or ``tar.gz`` for an archive Content-Type; None for any other."""
    main = (content_type or "").split(";", 1)[0].strip().lower()
    return ARCHIVE_TYPES.get(main)


@dataclass
class _Entry:
    name: str  # as written in the archive
    is_dir: bool
    size: int  # declared uncompressed size
    refused: str | None  # why it is not a plain file or folder ("symlink", ...), None if it is
    compressed: int | None  # zip only
    open: Callable[[], AbstractContextManager[IO[bytes]]]


def _zip_entries(path: Path) -> Iterator[_Entry]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ConfigError(
            f"the upload is not a readable zip archive ({exc}): send the .zip file as it was written"
        ) from None
    with archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            refused = None
            if stat.S_ISLNK(mode):
                refused = "symlink"
            elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                refused = "device or special file"
            elif info.flag_bits & 0x1:
                refused = "encrypted entry"
            yield _Entry(
                name=info.filename,
                is_dir=info.is_dir(),
                size=info.file_size,
                refused=refused,
                compressed=info.compress_size,
                open=lambda info=info: archive.open(info),  # type: ignore[misc]
            )


class _Capped(io.RawIOBase):
    """A read-only stream that refuses any single read over :data:`MAX_READ`: tarfile reads a long
    name or pax header whole, so a compressed header of gigabytes would otherwise fill the memory."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_READ:
            raise TooLarge(f"the archive has an entry header over {MAX_READ >> 20} MiB: this is not a data set")
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()
        super().close()


def _tar_entries(path: Path) -> Iterator[_Entry]:
    with path.open("rb") as head:
        gz = head.read(2) == b"\x1f\x8b"
    raw: IO[bytes] = gzip.open(path, "rb") if gz else path.open("rb")  # noqa: SIM115 - closed with the archive
    try:
        archive = tarfile.open(fileobj=_Capped(raw), mode="r:")  # type: ignore[arg-type]  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raw.close()
        raise ConfigError(
            f"the upload is not a readable tar archive ({exc}): send the .tar or .tar.gz as it was written"
        ) from None
    with archive, raw:
        for member in archive:
            refused = None
            if member.issym():
                refused = "symlink"
            elif member.islnk():
                refused = "hardlink"
            elif not (member.isfile() or member.isdir()) or member.issparse():
                refused = "device or special file"

            def opener(member: tarfile.TarInfo = member) -> AbstractContextManager[IO[bytes]]:
                handle = archive.extractfile(member)
                if handle is None:  # pragma: no cover - only plain files are opened
                    raise ConfigError(f"{member.name}: cannot be read from the archive")
                return handle

            yield _Entry(
                name=member.name, is_dir=member.isdir(), size=member.size, refused=refused, compressed=None, open=opener
            )


def _clean(name: str) -> tuple[PurePosixPath | None, str | None]:
    """(relative path, None) for a safe entry name, else (None, why)."""
    if "\x00" in name:
        return None, "NUL byte in the name"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        return None, "absolute path"
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "'..' in the path"
    if not parts:
        return None, "empty name"
    return PurePosixPath(*parts), None


def _ignored(rel: PurePosixPath) -> bool:
    """Hidden files and folders, and the resource forks macOS adds to zips."""
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.parts)


class _Problems:
    """Refused entries by reason, reported together."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, name: str) -> None:
        self.by_reason.setdefault(reason, []).append(name)

    def raise_if_any(self) -> None:
        if not self.by_reason:
            return
        parts = []
        for reason, names in self.by_reason.items():
            shown = ", ".join(repr(n[:200]) for n in names[:NAMES_SHOWN])
            more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
            parts.append(f"{reason} ({len(names)}): {shown}{more}")
        raise ConfigError(
            "the archive has entries that cannot be accepted: "
            + "; ".join(parts)
            + ". An upload holds only image files in class folders: remove these entries and upload again"
        )


def extract(archive: Path, kind: str, dest: Path, *, max_files: int, max_bytes: int) -> int:
    """Check every entry of ``archive`` (``zip``, ``tar`` or ``tar.gz``) and write the images into
    ``dest`` (a new, empty folder). Returns the number of files written.

    Raises:
        ConfigError: the archive is corrupt, or has entries that are refused (all listed).
        TooLarge: more than ``max_files`` entries, or more than ``max_bytes`` uncompressed, or a zip bomb.
    """
    from inco_core.files import IMAGE_EXTENSIONS

    dest.mkdir(parents=True, exist_ok=False)
    problems = _Problems()
    count = written = total = 0
    try:
        with closing(_zip_entries(archive) if kind == "zip" else _tar_entries(archive)) as entries:
            for entry in entries:
                count += 1
                if count > max_files:
                    raise TooLarge(
                        f"the archive holds more than {max_files} entries (INCO_MAX_UPLOAD_FILES): upload it in parts"
                    )
                total += entry.size  # every entry, read or skipped: bounds the work on a tar.gz bomb
                if total > max_bytes:
                    raise TooLarge(f"the archive unpacks to more than {max_bytes} bytes: upload the data set in parts")
                rel, why = _clean(entry.name)
                if rel is None:
                    problems.add(why or "bad name", entry.name)
                    continue
                if entry.refused:
                    problems.add(entry.refused, entry.name)
                    continue
                if _ignored(rel) or entry.is_dir:
                    continue
                if rel.suffix.lower() not in IMAGE_EXTENSIONS:
                    problems.add(f"not an image ({', '.join(IMAGE_EXTENSIONS)})", entry.name)
                    continue
                if (
                    entry.compressed is not None
                    and entry.size > RATIO_FLOOR
                    and entry.size > MAX_RATIO * entry.compressed
                ):
                    raise TooLarge(
                        f"{entry.name!r} is compressed {entry.size // max(entry.compressed, 1)} times "
                        f"(at most {MAX_RATIO} is accepted): this looks like a zip bomb"
                    )
                if problems.by_reason:
                    continue  # the upload fails anyway: only look for more problems
                total += _write(entry, dest / rel, max_bytes - total + entry.size) - entry.size
                written += 1
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
        raise ConfigError(f"the archive is corrupt ({exc}): check the file and upload it again") from None
    problems.raise_if_any()
    return written


def _write(entry: _Entry, target: Path, room: int) -> int:
    """Copy one entry to ``target`` (created, never overwritten); returns the bytes written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with entry.open() as src, target.open("xb") as out:
            n = 0
            while chunk := src.read(CHUNK):
                n += len(chunk)
                if n > room:
                    raise TooLarge("the archive unpacks to more than its headers say: upload the data set in parts")
                out.write(chunk)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"{entry.name!r} appears twice in the archive, or as both a file and a folder") from None
    except OSError as exc:
        if isinstance(exc, zipfile.BadZipFile):  # pragma: no cover - BadZipFile is not an OSError
            raise
        raise ConfigError(f"cannot unpack {entry.name!r}: {exc.strerror or exc}") from None
    return n


def single_root(folder: Path) -> Path:
    """The folder that holds the data set: ``folder``, or its only sub-folder when an archive wrapped
    everything in one (``neu-cls/crazing/...``); one class alone is never a data set."""
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and not children[0].is_symlink():
        return children[0]
    return folder


def remove(path: Path) -> None:
    """Delete a folder or file if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
