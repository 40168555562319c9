"""Images that cannot be decoded inside a data set: ``data.on_corrupt = "fail"`` names the file,
``"skip"`` leaves it out with a warning that lists it, with and without the decoded-image cache."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import inco_core.data as data
from inco_core.config import load_spec
from inco_core.data import load_images
from inco_core.errors import DataError, ImageDecodeError
from inco_core.experiment import load_split

CLASSES = ("crazing", "patches", "scratches")
BAD = ("crazing/truncated.jpg", "patches/garbage.bmp", "scratches/empty.png")


def _clean_copy(neu_path: Path, folder: Path) -> Path:
    for cls in CLASSES:
        (folder / cls).mkdir(parents=True)
        for i in range(1, 5):
            shutil.copy(neu_path / cls / f"{cls}_{i}.jpg", folder / cls)
    return folder


@pytest.fixture
def clean(neu_path: Path, tmp_path: Path) -> Path:
    return _clean_copy(neu_path, tmp_path / "clean")


@pytest.fixture
def dirty(neu_path: Path, tmp_path: Path) -> Path:
    """12 real NEU-CLS images in 3 classes plus a truncated JPEG, a garbage BMP and an empty PNG."""
    folder = _clean_copy(neu_path, tmp_path / "dirty")
    jpeg = (neu_path / "crazing" / "crazing_9.jpg").read_bytes()
    (folder / BAD[0]).write_bytes(jpeg[: len(jpeg) // 3])
    (folder / BAD[1]).write_bytes(b"BM" + bytes(range(256)) * 8)
    (folder / BAD[2]).write_bytes(b"")
    return folder


def test_fail_names_the_first_bad_file(dirty: Path) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_images(dirty, 32)
    assert info.value.path == dirty / BAD[0]
    assert "truncated.jpg" in str(info.value) and "remove or replace the file" in str(info.value)
    (dirty / BAD[0]).unlink()
    with pytest.raises(ImageDecodeError, match=r"garbage\.bmp"):
        load_images(dirty, 32)


def test_skip_loads_the_rest_and_warns_with_the_names(
    dirty: Path, clean: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="inco.data"):
        ds = load_images(dirty, 32, on_corrupt="skip")
    assert ds.skipped == tuple(sorted(BAD, key=lambda f: (f.split("/")[0], f)))
    assert len(ds) == 12 and ds.images.shape == (12, 1, 32, 32)
    assert ds.classes == list(CLASSES) and torch.bincount(ds.labels).tolist() == [4, 4, 4]
    assert not set(BAD) & set(ds.files)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 image(s)" in warning and all(name in warning for name in BAD)
    reference = load_images(clean, 32)  # the same 12 files without the bad ones
    assert torch.equal(ds.images, reference.images) and ds.files == reference.files
    assert ds.fingerprint == reference.fingerprint and ds.file_hashes == reference.file_hashes


def test_skip_works_through_the_cache(dirty: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = load_images(dirty, 32, cache_dir=cache, on_corrupt="skip")
    assert len(list(cache.glob("*.pt"))) == 1

    def no_decoding(path: Path, image_size: int) -> None:
        raise AssertionError(f"decoded {path} although the cache holds it")

    with monkeypatch.context() as m:
        m.setattr(data, "decode_image", no_decoding)
        again = load_images(dirty, 32, cache_dir=cache, on_corrupt="skip")
    assert again.skipped == first.skipped and torch.equal(again.images, first.images)
    assert again.fingerprint == first.fingerprint and torch.equal(again.labels, first.labels)
    # the cached entry skipped files, so "fail" decodes again and names the file
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg"):
        load_images(dirty, 32, cache_dir=cache, on_corrupt="fail")
    # fixing the files makes a new entry with nothing skipped
    for name in BAD:
        (dirty / name).unlink()
    fixed = load_images(dirty, 32, cache_dir=cache, on_corrupt="fail")
    assert fixed.skipped == () and len(fixed) == 12 and len(list(cache.glob("*.pt"))) == 2


def test_a_folder_of_only_bad_files_is_a_data_error(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / f"{cls}_1.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"no image under .* could be decoded"):
        load_images(tmp_path, 32, on_corrupt="skip")
    with pytest.raises(DataError, match="on_corrupt must be 'fail' or 'skip'"):
        load_images(tmp_path, 32, on_corrupt="ignore")  # type: ignore[arg-type]


def test_the_run_spec_chooses(dirty: Path, tmp_path: Path) -> None:
    """``data.on_corrupt`` of the spec reaches the loader that jobs use."""
    base = {"preset": "smoke", "data": {"path": str(dirty)}}
    spec = load_spec(base)
    assert spec.data.on_corrupt == "fail"
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg"):
        load_split(spec, spec.resolve(), tmp_path / "cache")
    spec = load_spec({**base, "data": {"path": str(dirty), "on_corrupt": "skip", "train_fraction": 0.5}})
    ds, split = load_split(spec, spec.resolve(), tmp_path / "cache")
    assert len(ds) == 12 and len(ds.skipped) == 3
    assert len(split.train) + len(split.test) == 12
