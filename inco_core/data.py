"""Load a labelled image folder once into uint8 tensors, with a content fingerprint and a disk cache.

Two layouts are read:

* ImageFolder: one sub-folder per class (``neu-cls/crazing/crazing_12.jpg``); images may sit in
  nested folders below the class folder.
* NEU-CLS original: all files in one folder, class in the name before the last ``_``
  (``Cr_12.bmp``, ``crazing_12.jpg``); the NEU abbreviations map to the folder names.

Images are converted to one channel and resized to ``image_size`` x ``image_size`` when they are
not that size already, so no epoch ever decodes a file again.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from inco_core.errors import DataError, ImageDecodeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pgm")
NEU_ABBREVIATIONS = {
    "cr": "crazing",
    "in": "inclusion",
    "pa": "patches",
    "ps": "pitted_surface",
    "rs": "rolled-in_scale",
    "sc": "scratches",
}
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ImageSet:
    """A decoded data set.

    images: [N, 1, S, S] uint8; labels: [N] int64 indexes into ``classes``;
    files: N paths relative to the root; file_hashes: N sha256 hex digests of the file bytes;
    fingerprint: sha256 over (relative path, class, file hash) of every file.
    """

    root: Path
    images: Tensor
    labels: Tensor
    classes: list[str]
    files: list[str]
    file_hashes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_below(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if _is_image(Path(dirpath) / f)]
    return found


def _neu_class(path: Path) -> str:
    stem = path.stem
    if "_" not in stem:
        raise DataError(
            f"cannot tell the class of {path}: loose images must be named <class>_<n> "
            "(e.g. Cr_12.bmp), or put each class in its own sub-folder"
        )
    prefix = stem.rsplit("_", 1)[0]
    return NEU_ABBREVIATIONS.get(prefix.lower(), prefix)


def scan(root: Path) -> list[tuple[Path, str]]:
    """(file, class name) of every image under ``root``, sorted by class then path.

    Raises:
        DataError: the folder is missing, holds no class folders or images, or mixes layouts.
    """
    if not root.exists():
        raise DataError(f"data path {root} does not exist: pass the folder that holds the images")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder: pass the folder that holds the images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    class_dirs = [d for d in subdirs if _images_below(d)]
    if class_dirs and loose:
        raise DataError(
            f"{root} has both class folders and loose images ({loose[0].name}, ...): "
            "move the loose images into their class folders"
        )
    if class_dirs:
        items = [(f, d.name) for d in class_dirs for f in _images_below(d)]
    elif loose:
        items = [(f, _neu_class(f)) for f in loose]
    else:
        raise DataError(
            f"no class folders under {root}: expected one sub-folder per defect class, "
            f"holding {', '.join(IMAGE_EXTENSIONS)} files"
        )
    return sorted(items, key=lambda item: (item[1], str(item[0])))


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
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(gray, dtype=np.uint8)


def load_images(root: str | Path, image_size: int, *, cache_dir: Path | None = None) -> ImageSet:
    """Decode every image under ``root`` once (or read them from ``cache_dir``).

    The cache file is keyed by the content fingerprint and ``image_size``, so an edited, added or
    removed file makes a new entry. Raises :class:`DataError` (see :func:`scan`, :func:`decode_image`).
    """
    root = Path(root).expanduser().resolve()
    items = scan(root)
    classes = sorted({c for _, c in items})
    class_index = {c: i for i, c in enumerate(classes)}
    files = [str(p.relative_to(root)) for p, _ in items]
    hashes = [_file_hash(p) for p, _ in items]
    digest = hashlib.sha256()
    for rel, (_, cls), h in zip(files, items, hashes, strict=True):
        digest.update(f"{rel}\0{cls}\0{h}\n".encode())
    fingerprint = digest.hexdigest()
    labels = torch.tensor([class_index[c] for _, c in items], dtype=torch.int64)

    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"images-{fingerprint[:24]}-{image_size}px.pt"
        cached = _read_cache(cache_file, fingerprint, len(items), image_size)
        if cached is not None:
            return ImageSet(root, cached, labels, classes, files, hashes, fingerprint)

    arrays = [decode_image(p, image_size) for p, _ in items]
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1).contiguous()  # [N, 1, S, S]
    if cache_file is not None:
        _write_cache(cache_file, fingerprint, images)
    return ImageSet(root, images, labels, classes, files, hashes, fingerprint)


def _read_cache(path: Path, fingerprint: str, n: int, size: int) -> Tensor | None:
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images = blob["images"]
        ok = (
            blob.get("format") == CACHE_FORMAT
            and blob.get("fingerprint") == fingerprint
            and tuple(images.shape) == (n, 1, size, size)
            and images.dtype == torch.uint8
        )
    except Exception:  # a broken cache file is rebuilt, never trusted
        return None
    return images if ok else None


def _write_cache(path: Path, fingerprint: str, images: Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"format": CACHE_FORMAT, "fingerprint": fingerprint, "images": images}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


def class_counts(labels: Tensor, classes: list[str]) -> dict[str, int]:
    counts = Counter(labels.tolist())
    return {c: counts.get(i, 0) for i, c in enumerate(classes)}
