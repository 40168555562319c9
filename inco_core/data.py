"""Load a labelled image folder once into uint8 tensors, with a content fingerprint and a disk cache.

Two layouts are read:

* ImageFolder: one sub-folder per class (``neu-cls/crazing/crazing_12.jpg``); images may sit in
  nested folders below the class folder.
* NEU-CLS original: all files in one folder, class in the name before the last ``_``
  (``Cr_12.bmp``, ``crazing_12.jpg``); the NEU abbreviations map to the folder names.

Images are converted to one channel and resized to ``image_size`` x ``image_size`` when they are
not that size already, so no epoch ever decodes a file again.

A file that cannot be decoded stops loading with an :class:`~inco_core.errors.ImageDecodeError`
that names it (``on_corrupt="fail"``, the default), or is left out with a logged warning that lists
it (``on_corrupt="skip"``); the files left out are in :attr:`ImageSet.skipped` and in the cache
entry, so a cached load skips the same files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from inco_core.errors import DataError, ImageDecodeError
from inco_core.files import scan

CACHE_FORMAT = 1
OnCorrupt = Literal["fail", "skip"]
SKIPPED_SHOWN = 20  # files named in the warning; ImageSet.skipped holds them all

log = logging.getLogger("inco.data")


@dataclass(frozen=True)
class ImageSet:
    """A decoded data set.

    images: [N, 1, S, S] uint8; labels: [N] int64 indexes into ``classes``;
    files: N paths relative to the root; file_hashes: N sha256 hex digests of the file bytes;
    fingerprint: sha256 over (relative path, class, file hash) of every file loaded;
    skipped: paths relative to the root of files left out because they could not be decoded.
    """

    root: Path
    images: Tensor
    labels: Tensor
    classes: list[str]
    files: list[str]
    file_hashes: list[str]
    fingerprint: str
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def _file_hash(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read the file ({exc.strerror or exc})") from None


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """One file -> [S, S] uint8 grayscale, resized with antialiasing when it is another size.

    Raises:
        ImageDecodeError: the file is not an image PIL can decode, or is truncated.
    """
    try:
        with Image.open(path) as img:
            img.load()
            gray = img.convert("L")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(path, str(exc) or type(exc).__name__) from None
    return _resized(gray, image_size)


def _resized(gray: Image.Image, image_size: int) -> np.ndarray:
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(gray, dtype=np.uint8)


# modes whose pixels are not 8-bit: convert("L") would clip them, not scale them
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def decode_bytes(data: bytes, name: str, image_size: int, *, max_pixels: int = 50_000_000) -> np.ndarray:
    """An uploaded image -> [S, S] uint8 grayscale, exactly as :func:`decode_image` turns a training
    file into pixels (RGB, RGBA and palette images become one channel the same way).

    Raises:
        ImageDecodeError: empty, not an image, truncated, over ``max_pixels`` pixels (a decompression
            bomb: the size is read from the header before any pixel is decoded), or 16/32-bit pixels.
    """
    if not data:
        raise ImageDecodeError(Path(name), "the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    Path(name),
                    f"{width} x {height} pixels is more than the {max_pixels:,} this service decodes "
                    "(a decompression bomb, or an image to scale down first)",
                )
            if img.mode in WIDE_MODES:
                raise ImageDecodeError(
                    Path(name),
                    f"its pixels are {img.mode} (16- or 32-bit); the models read 8-bit images: "
                    "convert it to 8-bit grayscale first",
                )
            img.load()
            gray = img.convert("L")
    except ImageDecodeError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ImageDecodeError(Path(name), str(exc) or type(exc).__name__) from None
    return _resized(gray, image_size)


def load_images(
    root: str | Path, image_size: int, *, cache_dir: Path | None = None, on_corrupt: OnCorrupt = "fail"
) -> ImageSet:
    """Decode every image under ``root`` once (or read them from ``cache_dir``).

    The cache file is keyed by the content fingerprint of every file and ``image_size``, so an
    edited, added or removed file makes a new entry; it records the files that were skipped.

    Args:
        on_corrupt: ``"fail"`` raises on the first file that cannot be read or decoded; ``"skip"``
            leaves such files out and logs one warning that lists them.

    Raises:
        DataError: see :func:`scan`; ImageDecodeError (``"fail"``) names the first bad file; with
            ``"skip"``, a DataError when fewer than two images of two classes are left.
    """
    if on_corrupt not in ("fail", "skip"):
        raise DataError(f"on_corrupt must be 'fail' or 'skip' (got {on_corrupt!r})")
    root = Path(root).expanduser().resolve()
    items = scan(root)
    hashes: list[str | None] = []
    for path, _ in items:
        try:
            hashes.append(_file_hash(path))
        except ImageDecodeError:
            if on_corrupt == "fail":
                raise
            hashes.append(None)  # unreadable: skipped below, and part of the cache key as such
    digest = hashlib.sha256()
    for (path, cls), h in zip(items, hashes, strict=True):
        digest.update(f"{path.relative_to(root)}\0{cls}\0{h}\n".encode())
    all_files = digest.hexdigest()  # every file as found: the cache key

    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"images-{all_files[:24]}-{image_size}px.pt"
        cached = _read_cache(cache_file, all_files, len(items), image_size, skip_ok=on_corrupt == "skip")
        if cached is not None:
            images, skipped = cached
            return _image_set(root, items, hashes, images, skipped)

    arrays, skipped = [], []
    for (path, _), h in zip(items, hashes, strict=True):
        try:
            if h is None:
                raise ImageDecodeError(path, "cannot read the file")
            arrays.append(decode_image(path, image_size))
        except ImageDecodeError:
            if on_corrupt == "fail":
                raise
            skipped.append(str(path.relative_to(root)))
    if not arrays:
        raise DataError(f"no image under {root} could be decoded ({len(skipped)} files): check the files' format")
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1).contiguous()  # [N, 1, S, S]
    if cache_file is not None:
        _write_cache(cache_file, all_files, images, skipped)
    return _image_set(root, items, hashes, images, skipped)


def _image_set(
    root: Path, items: list[tuple[Path, str]], hashes: list[str | None], images: Tensor, skipped: list[str]
) -> ImageSet:
    """The ImageSet of ``items`` less ``skipped``; ``images`` holds the kept files in order."""
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (" ..." if len(skipped) > SKIPPED_SHOWN else "")
        log.warning(
            "skipped %d image(s) under %s that cannot be decoded (data.on_corrupt is 'skip'): %s",
            len(skipped),
            root,
            shown,
        )
    left_out = set(skipped)
    kept = [
        (str(p.relative_to(root)), c, h)
        for (p, c), h in zip(items, hashes, strict=True)
        if str(p.relative_to(root)) not in left_out and h is not None
    ]
    classes = sorted({c for _, c, _ in kept})
    if len(kept) != images.shape[0]:
        raise DataError(f"the image cache of {root} does not match its files; delete the cache folder and retry")
    class_index = {c: i for i, c in enumerate(classes)}
    digest = hashlib.sha256()
    for rel, cls, h in kept:
        digest.update(f"{rel}\0{cls}\0{h}\n".encode())
    labels = torch.tensor([class_index[c] for _, c, _ in kept], dtype=torch.int64)
    files = [rel for rel, _, _ in kept]
    file_hashes = [h for _, _, h in kept if h is not None]
    return ImageSet(root, images, labels, classes, files, file_hashes, digest.hexdigest(), tuple(skipped))


def _read_cache(path: Path, fingerprint: str, n: int, size: int, *, skip_ok: bool) -> tuple[Tensor, list[str]] | None:
    """(images, skipped files) from a cache entry that matches; None to decode again. An entry that
    skipped files is a miss unless ``skip_ok``, so ``on_corrupt='fail'`` still names the file."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images = blob["images"]
        skipped = [str(f) for f in blob.get("skipped", [])]
        ok = (
            blob.get("format") == CACHE_FORMAT
            and blob.get("fingerprint") == fingerprint
            and tuple(images.shape) == (n - len(skipped), 1, size, size)
            and images.dtype == torch.uint8
            and (skip_ok or not skipped)
        )
    except Exception:  # a broken cache file is rebuilt, never trusted
        return None
    return (images, skipped) if ok else None


def _write_cache(path: Path, fingerprint: str, images: Tensor, skipped: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"format": CACHE_FORMAT, "fingerprint": fingerprint, "images": images, "skipped": skipped}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


def class_counts(labels: Tensor, classes: list[str]) -> dict[str, int]:
    counts = Counter(labels.tolist())
    return {c: counts.get(i, 0) for i, c in enumerate(classes)}
