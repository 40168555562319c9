"""Which files are images. No torch here: ``inco predict`` and the API's upload checks read it
without loading torch (seconds of CPU per command)."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pgm")


def is_image(path: Path) -> bool:
    """A file with an image extension that is not hidden."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
