"""Bags: dataset items, padding + mask collate, deterministic instance sampling, feature mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emclip.data import BagDataset, ImageTransform, collate_bags, load_cohort


@pytest.fixture(scope="module")
def cohort(tiny_cohort):
    return load_cohort(tiny_cohort)


def test_items_and_padded_collate(cohort):
    ds = BagDataset(cohort, "train", transform=ImageTransform(32))
    items = [ds[i] for i in range(4)]
    sizes = [len(it["images"]) for it in items]
    batch = collate_bags(items)
    b, k = 4, max(sizes)
    assert batch["images"].shape == (b, k, 3, 32, 32)
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum(1).tolist() == sizes
    assert batch["scales"].shape == batch["nm_per_pixel"].shape == (b, k)
    for i, n in enumerate(sizes):
        assert torch.all(batch["images"][i, n:] == 0) and torch.all(batch["image_index"][i, n:] == -1)
        assert torch.all(batch["scales"][i, n:] == 1.0)
        # 48-px source resized to 32 px: effective scale = nm/px x 48/32
        torch.testing.assert_close(batch["scales"][i, :n], batch["nm_per_pixel"][i, :n] * 1.5)
    assert batch["reports"][0] == cohort.report(batch["patient_ids"][0]).report
    assert len(batch["image_paths"][2]) == sizes[2]


def test_instance_sampling_is_deterministic_and_changes_by_epoch(cohort):
    pid_index = max(range(len(cohort.patient_ids())), key=lambda i: len(cohort.bag(cohort.patient_ids()[i])))
    ds = BagDataset(cohort, None, transform=ImageTransform(32), max_instances=2, seed=7)
    n = len(cohort.bag(cohort.patient_ids()[pid_index]))
    assert n > 3
    a, b = ds[pid_index]["image_index"], ds[pid_index]["image_index"]
    assert len(a) == 2 and torch.equal(a, b)
    picks = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        picks.add(tuple(ds[pid_index]["image_index"].tolist()))
    assert len(picks) > 1


def test_feature_mode(cohort):
    feats = np.arange(len(cohort.images) * 5, dtype=np.float32).reshape(-1, 5)
    ds = BagDataset(cohort, "val", features=feats)
    batch = collate_bags([ds[0], ds[1]])
    assert "images" not in batch and batch["features"].shape[2] == 5
    first = batch["image_index"][0, 0]
    torch.testing.assert_close(batch["features"][0, 0], torch.from_numpy(feats[first]))


def test_cached_features_carry_the_effective_scale(cohort):
    """A cached image was resized by its zoom: the model must see nm/px x zoom (a 2048 px image read at 224 px is
    ~9x coarser per pixel), while nm_per_pixel keeps the file's own value."""
    feats = np.zeros((len(cohort.images), 3), dtype=np.float32)
    zoom = np.linspace(1.0, 9.0, len(cohort.images)).astype(np.float32)
    item = BagDataset(cohort, "val", features=feats, feature_zoom=zoom)[0]
    rows = item["image_index"].numpy()
    expected = cohort.images.nm_per_pixel.to_numpy()[rows] * zoom[rows]
    np.testing.assert_allclose(item["scales"].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(item["nm_per_pixel"].numpy(), cohort.images.nm_per_pixel.to_numpy()[rows], rtol=1e-6)
    assert not np.allclose(item["scales"].numpy(), item["nm_per_pixel"].numpy())


def test_empty_bag_and_bad_arguments_raise(cohort):
    item = BagDataset(cohort, "train", transform=ImageTransform(32))[0]
    empty = dict(item, images=item["images"][:0], scales=item["scales"][:0], nm_per_pixel=item["nm_per_pixel"][:0],
                 image_index=item["image_index"][:0], patient_id="PX")
    with pytest.raises(ValueError, match="empty bag.*PX"):
        collate_bags([item, empty])
    with pytest.raises(ValueError, match="exactly one of"):
        BagDataset(cohort, "train")
