"""Loading, the 60/40 split and the nested ratio subsets on the real NEU-CLS images."""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inco_core.data import ImageSet, load_images, scan
from inco_core.errors import DataError, ImageDecodeError
from inco_core.splits import indices_sha256, labelled_subsets, split_record, stratified_split

RATIOS = [32, 16, 8, 4, 2]


def _split(ds: ImageSet, seed: int = 0):
    return stratified_split(ds.labels, ds.file_hashes, ds.classes, train_fraction=0.6, seed=seed)


def test_neu_cls_loads_as_six_classes_of_300(neu32: ImageSet) -> None:
    assert neu32.images.shape == (1800, 1, 32, 32)
    assert neu32.images.dtype == torch.uint8
    assert neu32.classes == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    assert torch.bincount(neu32.labels).tolist() == [300] * 6
    assert len(neu32.fingerprint) == 64


def test_split_sizes_and_reproducibility(neu32: ImageSet) -> None:
    split = _split(neu32)
    assert (len(split.train), len(split.test)) == (1080, 720)
    assert torch.bincount(neu32.labels[split.train]).tolist() == [180] * 6
    assert torch.bincount(neu32.labels[split.test]).tolist() == [120] * 6
    assert not set(split.train.tolist()) & set(split.test.tolist())
    again = _split(neu32)
    assert torch.equal(split.train, again.train)
    assert not torch.equal(split.train, _split(neu32, seed=1).train)


def test_duplicate_pair_stays_on_one_side(neu32: ImageSet) -> None:
    a = neu32.files.index("patches/patches_101.jpg")
    b = neu32.files.index("patches/patches_105.jpg")
    assert neu32.file_hashes[a] == neu32.file_hashes[b]
    for seed in range(5):
        split = _split(neu32, seed)
        train = set(split.train.tolist())
        assert (a in train) == (b in train)


def test_subset_sizes_and_nesting(neu32: ImageSet) -> None:
    split = _split(neu32)
    subsets = labelled_subsets(neu32.labels, split.train, neu32.classes, RATIOS, seed=0)
    per_class = {r: torch.bincount(neu32.labels[subsets[r]]).tolist() for r in RATIOS}
    assert per_class == {32: [6] * 6, 16: [11] * 6, 8: [22] * 6, 4: [45] * 6, 2: [90] * 6}
    for small, big in itertools.pairwise(RATIOS):
        assert set(subsets[small].tolist()) <= set(subsets[big].tolist())
    assert set(subsets[2].tolist()) <= set(split.train.tolist())
    same = labelled_subsets(neu32.labels, split.train, neu32.classes, [32], seed=0)[32]
    other = labelled_subsets(neu32.labels, split.train, neu32.classes, [32], seed=1)[32]
    assert torch.equal(same, subsets[32])
    assert not torch.equal(other, subsets[32])


def test_ratio_that_leaves_a_class_empty_is_an_error(neu32: ImageSet) -> None:
    split = _split(neu32)
    with pytest.raises(DataError, match=r"ratio 1:361 leaves no labelled image in class crazing.*1:359"):
        labelled_subsets(neu32.labels, split.train, neu32.classes, [361], seed=0)


def _make_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 40)) -> None:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", size, color=(i * 37) % 255).save(root / cls / f"{cls}_{i}.png")


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "nope", 32)
    with pytest.raises(DataError, match="no class folders under"):
        load_images(tmp_path, 32)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="one sub-folder per defect class"):
        load_images(tmp_path, 32)


def test_class_with_too_few_images(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"a": 5, "b": 1})
    ds = load_images(tmp_path, 16)
    with pytest.raises(DataError, match="class b has 1 image"):
        stratified_split(ds.labels, ds.file_hashes, ds.classes, train_fraction=0.6, seed=0)


def test_corrupt_image_is_named(tmp_path: Path, neu_path: Path) -> None:
    _make_tree(tmp_path, {"a": 3, "b": 3})
    good = (neu_path / "crazing" / "crazing_1.jpg").read_bytes()
    (tmp_path / "b" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg") as info:
        load_images(tmp_path, 16)
    assert info.value.path.name == "broken.jpg"
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
        load_images(tmp_path, 16)


def test_mixed_sizes_and_colour_are_resized_to_one_gray_size(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"a": 2}, size=(50, 30))
    _make_tree(tmp_path, {"b": 2}, size=(200, 200))
    Image.new("RGB", (64, 80), color=(200, 10, 10)).save(tmp_path / "b" / "rgb.jpg")
    ds = load_images(tmp_path, 24)
    assert ds.images.shape == (5, 1, 24, 24)
    assert ds.classes == ["a", "b"]


def test_neu_original_flat_naming(tmp_path: Path, neu_path: Path) -> None:
    for abbr, folder in (("Cr", "crazing"), ("PS", "pitted_surface")):
        for i in (1, 2):
            shutil.copy(neu_path / folder / f"{folder}_{i}.jpg", tmp_path / f"{abbr}_{i}.bmp")
    items = scan(tmp_path)
    assert sorted({c for _, c in items}) == ["crazing", "pitted_surface"]
    (tmp_path / "stray.bmp").write_bytes((tmp_path / "Cr_1.bmp").read_bytes())
    with pytest.raises(DataError, match=r"cannot tell the class of .*stray\.bmp"):
        scan(tmp_path)


def test_mixed_layout_is_an_error(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"a": 2})
    Image.new("L", (8, 8)).save(tmp_path / "a_9.png")
    with pytest.raises(DataError, match="both class folders and loose images"):
        scan(tmp_path)


def test_cache_is_reused_and_keyed_by_content(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _make_tree(data, {"a": 2, "b": 2})
    first = load_images(data, 16, cache_dir=cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    again = load_images(data, 16, cache_dir=cache)
    assert torch.equal(first.images, again.images) and again.fingerprint == first.fingerprint
    files[0].write_bytes(b"garbage")  # a broken cache entry is rebuilt, not trusted
    assert torch.equal(load_images(data, 16, cache_dir=cache).images, first.images)
    Image.new("L", (40, 40), color=255).save(data / "a" / "a_0.png")  # change one file
    changed = load_images(data, 16, cache_dir=cache)
    assert changed.fingerprint != first.fingerprint
    assert not torch.equal(changed.images, first.images)
    assert len(list(cache.glob("*.pt"))) == 2


def test_indices_sha256_is_the_hash_of_the_sorted_int64_indices(neu32: ImageSet) -> None:
    split = stratified_split(neu32.labels, neu32.file_hashes, neu32.classes, train_fraction=0.6, seed=0)
    expected = hashlib.sha256(np.sort(split.test.numpy()).astype("<i8").tobytes()).hexdigest()
    assert indices_sha256(split.test) == expected
    assert indices_sha256(split.test.flip(0)) == expected  # a set: the order does not count
    assert split_record(split) == {
        "train_sha256": indices_sha256(split.train),
        "test_sha256": expected,
        "n_train": 1080,
        "n_test": 720,
    }
