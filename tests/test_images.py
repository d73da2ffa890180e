"""Image IO: bit depths, formats, colour, the resize/crop policy and the effective scale it implies."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from emclip.data import ImageReadError, ImageTransform, read_image


def test_16bit_tiff_keeps_its_range(tmp_path):
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    tifffile.imwrite(tmp_path / "a.tif", ramp)
    img = read_image(tmp_path / "a.tif")
    assert img.dtype == np.float32 and img.min() == 0 and img.max() == pytest.approx(65520 / 65535)
    assert len(np.unique(img)) == 4096                           # far beyond 8-bit: detail kept
    np.testing.assert_allclose(img, ramp / 65535, atol=1e-7)


def test_8bit_tiff_png_jpeg_and_rgb(tmp_path):
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    tifffile.imwrite(tmp_path / "g.tif", gray)
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = np.stack([gray, gray // 2, 255 - gray], -1)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_allclose(read_image(tmp_path / "g.tif"), gray / 255, atol=1e-7)
    np.testing.assert_allclose(read_image(tmp_path / "g.png"), gray / 255, atol=1e-7)
    lum = (rgb / 255.0) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(read_image(tmp_path / "c.png"), lum, atol=1e-5)
    assert read_image(tmp_path / "c.jpg").shape == (48, 64)
    assert read_image(tmp_path / "c.png", color="rgb").shape == (48, 64, 3)


def test_16bit_png(tmp_path):
    arr = (np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)
    Image.fromarray(arr).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), arr / 65535, atol=1e-6)


def test_percentile_intensity_stretches_12bit_data(tmp_path):
    arr = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    assert read_image(tmp_path / "a.tif").max() < 0.07
    assert read_image(tmp_path / "a.tif", intensity="percentile").max() == 1.0


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"garbage" * 20)
    with pytest.raises(ImageReadError, match="bad.tif: cannot decode image"):
        read_image(tmp_path / "bad.tif")
    with pytest.raises(ImageReadError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")


def test_resize_policy_and_effective_zoom():
    img = np.random.default_rng(0).random((600, 400), dtype=np.float32)
    t, zoom = ImageTransform(224, policy="resize")(img)
    assert t.shape == (3, 224, 224) and zoom == pytest.approx(400 / 224)
    assert torch.equal(t[0], t[1])                               # gray replicated to the tower's 3 channels
    mean_in = (img.mean() - 0.5) / 0.5
    assert float(t.mean()) == pytest.approx(mean_in, abs=0.02)


def test_crop_policy_keeps_native_scale_and_pads_small_images():
    big = np.random.default_rng(0).random((300, 300), dtype=np.float32)
    t, zoom = ImageTransform(128, policy="crop")(big)
    assert zoom == 1.0 and t.shape == (3, 128, 128)
    np.testing.assert_allclose(t[0].numpy(), (big[86:214, 86:214] - 0.5) / 0.5, atol=1e-6)
    small = np.random.default_rng(1).random((50, 70), dtype=np.float32)
    t, zoom = ImageTransform(128, policy="crop")(small)
    assert t.shape == (3, 128, 128) and zoom == 1.0
    r1 = ImageTransform(128, policy="crop")(big, np.random.default_rng(5))[0]
    r2 = ImageTransform(128, policy="crop")(big, np.random.default_rng(5))[0]
    assert torch.equal(r1, r2)
