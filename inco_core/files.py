"""Which files are images, and the labelled images of a folder. No torch here: ``inco predict``,
``inco run``'s first checks and the API's upload and data set checks read it without loading torch
(seconds of CPU per command)."""

from __future__ import annotations

import os
from pathlib import Path

from inco_core.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pgm")
NEU_ABBREVIATIONS = {
    "cr": "crazing",
    "in": "inclusion",
    "pa": "patches",
    "ps": "pitted_surface",
    "rs": "rolled-in_scale",
    "sc": "scratches",
}


def is_image(path: Path) -> bool:
    """A file with an image extension that is not hidden."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_below(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if is_image(Path(dirpath) / f)]
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
    loose = sorted(p for p in root.iterdir() if is_image(p))
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
