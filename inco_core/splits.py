"""The protocol's split: stratified 60/40 train/test, and nested labelled subsets per ratio.

Both are seeded and reproducible. Byte-identical files of a class are kept on one side of the
train/test split, so no test image is also a training image.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from inco_core.errors import DataError


@dataclass(frozen=True)
class Split:
    """train / test: sorted int64 indices into the :class:`~inco_core.data.ImageSet`."""

    train: Tensor
    test: Tensor


def stratified_split(
    labels: Tensor, file_hashes: list[str], classes: list[str], *, train_fraction: float, seed: int
) -> Split:
    """Per class, round(n_c * train_fraction) images go to train, the rest to test.

    Groups of byte-identical files move together. Raises :class:`DataError` when a class has
    fewer than 2 images (one is needed on each side).
    """
    gen = torch.Generator().manual_seed(seed)
    train: list[int] = []
    test: list[int] = []
    for c, name in enumerate(classes):
        members = (labels == c).nonzero().flatten().tolist()
        if len(members) < 2:
            raise DataError(
                f"class {name} has {len(members)} image(s): each class needs at least 2, "
                "one for training and one for testing"
            )
        groups: dict[str, list[int]] = defaultdict(list)
        for i in members:
            groups[file_hashes[i]].append(i)
        ordered = list(groups.values())
        n_train = min(max(round(len(members) * train_fraction), 1), len(members) - 1)
        taken = 0
        for g in torch.randperm(len(ordered), generator=gen).tolist():
            group = ordered[g]
            if taken + len(group) <= n_train:
                train += group
                taken += len(group)
            else:
                test += group
    return Split(torch.tensor(sorted(train)), torch.tensor(sorted(test)))


def indices_sha256(indices: Tensor) -> str:
    """SHA-256 (hex) of a set of image indices: the sorted indices as little-endian int64 bytes.

    Recorded in ``result.json`` so that a run's split and labelled subsets can be audited and
    reproduced: ``hashlib.sha256(np.sort(idx).astype("<i8").tobytes()).hexdigest()`` elsewhere.
    """
    values = torch.sort(torch.as_tensor(indices, dtype=torch.int64).flatten()).values
    return hashlib.sha256(values.numpy().astype("<i8").tobytes()).hexdigest()


def split_record(split: Split) -> dict[str, int | str]:
    """What ``result.json`` records of a split: the hashes and sizes of its two sides."""
    return {
        "train_sha256": indices_sha256(split.train),
        "test_sha256": indices_sha256(split.test),
        "n_train": len(split.train),
        "n_test": len(split.test),
    }


def labelled_count(n_train: int, ratio: int) -> int:
    """round(n / ratio) labelled images of a class with n training images (180 / 32 -> 6)."""
    return round(n_train / ratio)


def labelled_subsets(
    labels: Tensor, train: Tensor, classes: list[str], ratios: list[int], *, seed: int
) -> dict[int, Tensor]:
    """For each ratio N, the labelled training images of ``1:N``: round(n_c / N) per class.

    One seeded permutation per class is cut at every size, so the subsets are nested (the 1:32
    set lies inside the 1:16 set, ...). Returns {N: sorted int64 indices}. Raises
    :class:`DataError` when a ratio leaves a class without a labelled image.
    """
    gen = torch.Generator().manual_seed(seed)
    train_labels = labels[train]
    orders: list[Tensor] = []
    for c, name in enumerate(classes):
        members = train[train_labels == c]
        orders.append(members[torch.randperm(len(members), generator=gen)])
        for ratio in ratios:
            if labelled_count(len(members), ratio) < 1:
                # round(n / r) >= 1 holds up to r = 2n - 1
                fix = f"use 1:{2 * len(members) - 1} or less" if len(members) else "add images"
                raise DataError(
                    f"ratio 1:{ratio} leaves no labelled image in class {name} ({len(members)} training images): {fix}"
                )
    return {
        ratio: torch.sort(torch.cat([o[: labelled_count(len(o), ratio)] for o in orders])).values for ratio in ratios
    }
