"""The fused loader (``load_transformed``) equals ``ImageTransform(read_image(...))``: every sample type, colour,
orientation, intensity mode and geometry, and it refuses and warns exactly as ``read_image`` does."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from emclip.data import ImageReadError, ImageTransform, read_image
from emclip.data.images import load_transformed
from emclip.data.resample import bands, resize_plane

from test_image_io_hostile import _damaged, _png_declaring, _tiff_declaring

ATOL = 2e-6       # float32 rounding of a [-1, 1] tensor after a ~20-tap sum; a real difference is >= 1 / 65535


def _same(path, transform, intensity="dtype", color="gray", seed=None):
    """Both paths on one file: the tensors agree to float rounding and the zooms exactly."""
    rng = (lambda: np.random.default_rng(seed)) if seed is not None else (lambda: None)
    want, want_zoom = transform(read_image(path, intensity, color), rng())
    got, got_zoom = load_transformed(path, transform, intensity, color, rng())
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    assert got_zoom == want_zoom
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _em_like(shape, dtype, rng, lo=0.05, hi=0.9):
    """Smooth structure plus noise spanning most of the dtype's range (a real difference shows after resizing)."""
    info = np.iinfo(dtype)
    coarse = torch.from_numpy(rng.random((1, 1, 8, 8), dtype=np.float32))
    smooth = F.interpolate(coarse, size=shape[:2], mode="bicubic", align_corners=False)[0, 0].numpy()
    x = np.clip(lo + (hi - lo) * smooth + rng.normal(0, 0.05, shape[:2]), 0, 1)
    if len(shape) == 3:
        x = np.stack([x, x[::-1], 1 - x], -1)
    return (info.min + x * (info.max - info.min)).round().astype(dtype)


SHAPES = [(997, 1301), (1301, 997), (224, 300), (100, 150), (31, 37), (224, 224), (480, 224)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("intensity", ["dtype", "percentile"])
def test_integer_tiffs_of_every_size_and_intensity_mode(tmp_path, dtype, shape, intensity):
    tifffile.imwrite(tmp_path / "a.tif", _em_like(shape, dtype, np.random.default_rng(0)))
    for transform in (ImageTransform(224), ImageTransform(64), ImageTransform(224, channels=1)):
        _same(tmp_path / "a.tif", transform, intensity)


@pytest.mark.parametrize("policy,seed", [("crop", None), ("crop", 7), ("resize", 7)])
@pytest.mark.parametrize("shape", [(997, 1301), (300, 240), (100, 150), (31, 300)])
def test_crop_policy_centre_random_and_padded(tmp_path, policy, seed, shape):
    tifffile.imwrite(tmp_path / "a.tif", _em_like(shape, np.uint16, np.random.default_rng(1)))
    for intensity in ("dtype", "percentile"):
        _same(tmp_path / "a.tif", ImageTransform(128, policy=policy), intensity, seed=seed)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_before_the_geometry(tmp_path, orientation):
    arr = _em_like((333, 517), np.uint16, np.random.default_rng(2))
    tifffile.imwrite(tmp_path / "o.tif", arr, extratags=[(274, "H", 1, orientation, True)])
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray((arr >> 8).astype(np.uint8)).save(tmp_path / "o.png", exif=exif)
    for name in ("o.tif", "o.png"):
        _same(tmp_path / name, ImageTransform(224))
        _same(tmp_path / name, ImageTransform(96, policy="crop"), seed=3)


@pytest.mark.parametrize("planar", ["contig", "separate"])
@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_rgb_and_gray_tiffs_in_either_colour_mode(tmp_path, planar, color):
    rgb = _em_like((301, 257, 3), np.uint16, np.random.default_rng(3))
    data = rgb if planar == "contig" else np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="rgb", planarconfig=planar)
    tifffile.imwrite(tmp_path / "g.tif", rgb[..., 0])
    for name in ("c.tif", "g.tif"):
        for transform in (ImageTransform(224), ImageTransform(224, channels=1), ImageTransform(112, policy="crop")):
            for intensity in ("dtype", "percentile"):
                _same(tmp_path / name, transform, intensity, color)


def test_png_jpeg_8_and_16_bit_gray_and_rgb(tmp_path):
    rng = np.random.default_rng(4)
    Image.fromarray(_em_like((260, 390), np.uint16, rng)).save(tmp_path / "g16.png")
    Image.fromarray(_em_like((260, 390), np.uint8, rng)).save(tmp_path / "g8.png")
    Image.fromarray(_em_like((260, 390, 3), np.uint8, rng)).save(tmp_path / "c.png")
    Image.fromarray(_em_like((260, 390, 3), np.uint8, rng)).save(tmp_path / "c.jpg", quality=90)
    for name in ("g16.png", "g8.png", "c.png", "c.jpg"):
        for color in ("gray", "rgb"):
            for intensity in ("dtype", "percentile"):
                _same(tmp_path / name, ImageTransform(224), intensity, color)


def test_photometrics_bit_depths_and_the_types_read_the_plain_way(tmp_path):
    rng = np.random.default_rng(5)
    u16 = _em_like((300, 420), np.uint16, rng)
    tifffile.imwrite(tmp_path / "mw.tif", (u16 >> 8).astype(np.uint8), photometric="miniswhite")
    tifffile.imwrite(tmp_path / "u12.tif", u16 >> 4, bitspersample=12)
    over = u16 >> 3                                     # 13-bit values in a file declaring 12 bits: clipped first
    tifffile.imwrite(tmp_path / "over12.tif", over, bitspersample=12)
    tifffile.imwrite(tmp_path / "be.tif", u16, byteorder=">")
    tifffile.imwrite(tmp_path / "z.tif", u16, compression="zlib")
    tifffile.imwrite(tmp_path / "i32.tif", u16.astype(np.int32) * 7 - 100_000)
    tifffile.imwrite(tmp_path / "f32.tif", u16.astype(np.float32) / 65535)
    tifffile.imwrite(tmp_path / "f64.tif", u16.astype(np.float64) * 3 - 5)
    tifffile.imwrite(tmp_path / "bw.tif", u16 > 30000)
    tifffile.imwrite(tmp_path / "const.tif", np.full((300, 420), 1234, np.int16))
    cmap = (rng.random((3, 256)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "pal.tif", (u16 >> 8).astype(np.uint8), photometric="palette", colormap=cmap)
    for name in ("mw.tif", "u12.tif", "over12.tif", "be.tif", "z.tif", "i32.tif", "f32.tif", "f64.tif", "bw.tif",
                 "const.tif", "pal.tif"):
        for intensity in ("dtype", "percentile"):
            _same(tmp_path / name, ImageTransform(224), intensity)
            _same(tmp_path / name, ImageTransform(160, policy="crop"), intensity, "rgb", seed=1)


def test_non_finite_floats_warn_as_read_image_does(tmp_path):
    arr = np.random.default_rng(6).random((250, 300)).astype(np.float32) * 4
    arr[10, 10], arr[20, 30] = np.nan, np.inf
    tifffile.imwrite(tmp_path / "f.tif", arr)
    tifffile.imwrite(tmp_path / "o.tif", _em_like((250, 300), np.uint16, np.random.default_rng(6)),
                     extratags=[(274, "H", 1, 9, True)])
    for name in ("f.tif", "o.tif"):
        with warnings.catch_warnings(record=True) as old:
            warnings.simplefilter("always")
            want = ImageTransform(224)(read_image(tmp_path / name))[0]
        with warnings.catch_warnings(record=True) as new:
            warnings.simplefilter("always")
            got = load_transformed(tmp_path / name, ImageTransform(224))[0]
        assert [str(w.message) for w in new] == [str(w.message) for w in old] and old
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _refusal(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(err), str(err)
    return None


def test_hostile_files_are_refused_with_the_same_errors(tmp_path):
    names = list(_damaged(tmp_path))
    _tiff_declaring(tmp_path / "huge.tif", 20000, 20000)
    _png_declaring(tmp_path / "huge.png", 30000, 30000)
    Image.fromarray(np.zeros((2, 200), np.uint8)).save(tmp_path / "strip.png")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack",
                     planarconfig="separate")
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((8, 8, 4), np.uint8), photometric="separated")
    tifffile.imwrite(tmp_path / "nan.tif", np.full((8, 8), np.nan, np.float32))
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:
        tw.write(np.zeros((8, 8), np.uint8))
        tw.write(np.ones((8, 8), np.uint8))
    big = tmp_path / "big.tif"                       # uncompressed, memory-mappable, then its pixel data cut short
    tifffile.imwrite(big, np.ones((512, 512), np.uint16))
    (tmp_path / "bigcut.tif").write_bytes(big.read_bytes()[:300_000])
    tifffile.imwrite(tmp_path / "zcut0.tif", np.ones((512, 512), np.uint16), compression="zlib")
    (tmp_path / "zcut.tif").write_bytes((tmp_path / "zcut0.tif").read_bytes()[:2_000])
    names += ["huge.tif", "huge.png", "strip.png", "stack.tif", "cmyk.tif", "nan.tif", "pages.tif", "bigcut.tif",
              "zcut.tif"]
    for name in names:
        path = tmp_path / name
        want = _refusal(lambda: read_image(path, max_aspect=20))
        got = _refusal(lambda: load_transformed(path, ImageTransform(224), max_aspect=20))
        assert got == want, name
        if want is None:                          # a cut file that tifffile still reads: then equal pixels
            assert name in ("bigcut.tif", "zcut.tif"), name
            _same(path, ImageTransform(224))
        else:
            assert want[0] is ImageReadError, (name, want)
    for bad in ({"intensity": "minmax"}, {"color": "cmyk"}):
        with pytest.raises(ValueError, match="must be"):
            load_transformed(big, ImageTransform(224), **bad)


def test_uncompressed_pixels_are_mapped_not_copied(tmp_path, monkeypatch):
    """The fused path never builds a full-resolution float image and reads uncompressed pages without asarray's
    copy; only the plain path does."""
    tifffile.imwrite(tmp_path / "a.tif", _em_like((1024, 1024), np.uint16, np.random.default_rng(7)))
    copies = []
    real = tifffile.TiffPage.asarray

    def spy(self, *args, **kwargs):
        copies.append(kwargs.get("out"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", spy)
    load_transformed(tmp_path / "a.tif", ImageTransform(224))
    assert copies == ["memmap"]


def test_resize_plane_equals_torch_antialiased_bilinear():
    rng = np.random.default_rng(8)
    for (h, w), (oh, ow) in [((2048, 2048), (224, 224)), ((997, 1301), (224, 292)), ((5, 7), (224, 314)),
                             ((3000, 257), (2613, 224)), ((224, 300), (224, 300))]:
        x = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        ref = F.interpolate(torch.from_numpy(x.astype(np.float32))[None, None], size=(oh, ow), mode="bilinear",
                            antialias=True, align_corners=False)[0, 0].numpy()
        top, left = (oh - min(oh, 224)) // 2, (ow - 224) // 2
        got = resize_plane(x, bands(h, oh, top, min(oh, 224)), bands(w, ow, left, 224))
        np.testing.assert_allclose(got / 65535, ref[top:top + min(oh, 224), left:left + 224] / 65535, atol=3e-7,
                                   rtol=0, err_msg=f"{h}x{w} -> {oh}x{ow}")


def test_bags_and_the_cache_builder_read_through_the_fused_loader(tiny_cohort):
    """BagDataset (random crops drawn per bag) and the cache builder's rows give what the previous way gave."""
    from emclip.data import BagDataset, load_cohort
    from emclip.train.cache import _ImageRows
    cohort = load_cohort(tiny_cohort)
    transform = ImageTransform(32, policy="crop")
    ds = BagDataset(cohort, "train", transform=transform, intensity="percentile", random_crop=True, seed=4)
    ds.set_epoch(2)
    for index in range(3):
        item = ds[index]
        rng = np.random.default_rng([4, 2, index, 1])
        want = torch.stack([transform(read_image(p, "percentile"), rng)[0] for p in item["image_paths"]])
        torch.testing.assert_close(item["images"], want, atol=ATOL, rtol=0)
    paths = list(cohort.images.path)
    resize = ImageTransform(40)
    rows = _ImageRows(paths, [3, 0, 5], resize, "percentile", "rgb")
    for i, row in enumerate([3, 0, 5]):
        tensor, zoom, idx = rows[i]
        want, want_zoom = resize(read_image(paths[row], "percentile", "rgb"))
        torch.testing.assert_close(tensor, want, atol=ATOL, rtol=0)
        assert float(zoom) == pytest.approx(want_zoom) and int(idx) == row


def test_per_channel_mean_and_std_as_the_transform_normalises(tmp_path):
    """The fused path normalises in numpy; each channel with its own mean and std, exactly as ``_finish`` does."""
    rng = np.random.default_rng(12)
    tifffile.imwrite(tmp_path / "g.tif", _em_like((300, 260), np.uint16, rng))
    tifffile.imwrite(tmp_path / "c.tif", _em_like((260, 300, 3), np.uint8, rng), photometric="rgb")
    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for name in ("g.tif", "c.tif"):
        for channels in (3, 1):
            for color in ("gray", "rgb"):
                _same(tmp_path / name, ImageTransform(96, channels=channels, **imagenet), color=color)
