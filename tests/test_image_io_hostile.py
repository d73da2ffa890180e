"""Hostile image files: each is read correctly, refused with an ImageReadError naming the file and the problem, or
read with an ImageReadWarning (see the reading policy in emclip/data/images.py). Files are tiny and built here."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from emclip.data import ImageReadError, ImageReadWarning, probe_image, read_image, validate_cohort
from emclip.data.images import LUMA, MAX_PIXELS

RAMP = (np.arange(6 * 8) * 5).astype(np.uint8).reshape(6, 8)


def _tiff_declaring(path, width, height):
    """A ~400-byte TIFF whose header declares width x height: a small file with its size tags overwritten."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)
    return path


def _png_declaring(path, width, height):
    """A PNG header (IHDR) declaring width x height with no real pixel data: built by hand, a few dozen bytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails loudly (read_image would then report 'cannot decode', not the guard)."""
    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse)


# 1. non-finite floats ------------------------------------------------------------------------------------------------

def test_float_tiff_with_inf_and_nan_uses_the_finite_range(tmp_path):
    arr = np.array([[0.5, 2.0, np.inf], [4.0, np.nan, -np.inf]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", arr)
    with pytest.warns(ImageReadWarning, match=r"f\.tif: 3 of 6 pixel values are NaN or inf; .* set to 0"):
        img = read_image(tmp_path / "f.tif")
    expected = np.array([[0.0, 1.5 / 3.5, 0.0], [1.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(img, expected, atol=1e-6)          # one inf used to turn the whole image to 0
    with pytest.warns(ImageReadWarning):
        assert read_image(tmp_path / "f.tif", intensity="percentile")[1, 0] == 1.0


def test_float_tiff_without_a_finite_pixel_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "nan.tif", np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ImageReadError, match=r"nan\.tif: no finite pixel value \(all 16 are NaN or inf\)"):
        read_image(tmp_path / "nan.tif")


def test_float64_extremes_do_not_overflow(tmp_path):
    arr = np.array([[-1e308, 0.0], [1e308, 1e308]])
    tifffile.imwrite(tmp_path / "x.tif", arr)
    np.testing.assert_allclose(read_image(tmp_path / "x.tif"), [[0.0, 0.5], [1.0, 1.0]], atol=1e-6)


# 2. integer dtypes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,lo", [(np.int32, 100_000), (np.uint32, 7), (np.int16, -1000), (np.int8, -100),
                                      (np.int64, -5)])
def test_signed_and_32bit_integers_are_scaled_by_the_image_range(tmp_path, dtype, lo):
    arr = (lo + np.arange(48).reshape(6, 8) * 3).astype(dtype)
    tifffile.imwrite(tmp_path / "i.tif", arr)
    img = read_image(tmp_path / "i.tif")
    assert img.min() == 0.0 and img.max() == 1.0                  # not a constant, not squeezed into 0.51-0.56
    a = arr.astype(np.float64)
    np.testing.assert_allclose(img, (a - a.min()) / (a.max() - a.min()), atol=1e-6)
    pct = read_image(tmp_path / "i.tif", intensity="percentile")
    assert pct.min() == 0.0 and pct.max() == 1.0


def test_unsigned_8_16_and_12_bit_keep_the_full_scale(tmp_path):
    arr16 = np.array([[0, 1000], [30000, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", arr16)
    np.testing.assert_allclose(read_image(tmp_path / "u16.tif"), arr16 / 65535, atol=1e-7)
    arr12 = np.array([[0, 64], [2048, 4095]], np.uint16)
    tifffile.imwrite(tmp_path / "u12.tif", arr12, bitspersample=12)
    np.testing.assert_allclose(read_image(tmp_path / "u12.tif"), arr12 / 4095, atol=1e-7)


def test_constant_int32_image_reads_as_zeros(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.full((4, 4), 123456, np.int32))
    assert np.array_equal(read_image(tmp_path / "c.tif"), np.zeros((4, 4), np.float32))


# 3. photometric: MINISWHITE, PALETTE, Pillow modes --------------------------------------------------------------------

def test_miniswhite_tiff_is_inverted(tmp_path):
    arr = np.array([[0, 255], [100, 200]], np.uint8)              # MINISWHITE: 0 is white, 255 is black
    tifffile.imwrite(tmp_path / "mw.tif", arr, photometric="miniswhite")
    img = read_image(tmp_path / "mw.tif")
    assert img[0, 1] == 0.0 and img[0, 0] == 1.0                  # the dark pixel comes out dark
    np.testing.assert_allclose(img, 1 - arr / 255, atol=1e-7)


def test_bilevel_tiff_follows_its_photometric(tmp_path):
    mask = np.array([[True, False], [False, True]])
    tifffile.imwrite(tmp_path / "bw.tif", mask)                  # tifffile writes bilevel as MINISWHITE: 1 is black
    np.testing.assert_array_equal(read_image(tmp_path / "bw.tif"), np.where(mask, 0.0, 1.0))
    tifffile.imwrite(tmp_path / "bb.tif", mask, photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "bb.tif"), mask.astype(np.float32))


@pytest.mark.parametrize("scale", [65535, 255])                  # 16-bit colormap, and writers that store 8-bit values
def test_palette_tiff_maps_through_its_colormap(tmp_path, scale):
    cmap = np.zeros((3, 256), np.uint16)
    colours = {1: (1, 0, 0), 2: (0, 1, 0), 3: (1, 1, 1), 4: (0, 0, 1)}
    for i, rgb in colours.items():
        cmap[:, i] = np.array(rgb) * scale
    index = np.array([[0, 1, 2], [3, 4, 1]], np.uint8)
    tifffile.imwrite(tmp_path / "p.tif", index, photometric="palette", colormap=cmap)
    rgb = read_image(tmp_path / "p.tif", color="rgb")
    expected = np.array([[(0, 0, 0), colours[1], colours[2]], [colours[3], colours[4], colours[1]]], np.float32)
    np.testing.assert_allclose(rgb, expected, atol=1e-7)             # colours, not the raw indices 0..4
    np.testing.assert_allclose(read_image(tmp_path / "p.tif"), expected @ LUMA, atol=1e-6)


def test_palette_index_beyond_the_colormap_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.array([[0, 3]], np.uint8), photometric="palette",
                     colormap=np.zeros((3, 256), np.uint16))
    with tifffile.TiffFile(tmp_path / "p.tif", mode="r+b") as tif:   # a 2-entry colormap tag in an 8-bit file
        tag = tif.pages[0].tags["ColorMap"]
        with open(tmp_path / "p.tif", "r+b") as fh:
            fh.seek(tag.offset + 4)
            fh.write(struct.pack("<I", 6))                        # count: 3 x 2 entries
    with pytest.raises(ImageReadError, match=r"p\.tif: palette index 3 beyond the colormap.s 2 entries"):
        read_image(tmp_path / "p.tif")


def test_pillow_modes_1_p_la_and_16bit(tmp_path):
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), [[0, 1], [1, 0]])
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "p.png")
    np.testing.assert_allclose(read_image(tmp_path / "p.png", color="rgb"), [[(0, 0, 0), (1, 0, 0)]], atol=1e-7)
    Image.fromarray(RAMP).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png"), RAMP / 255, atol=1e-7)
    arr = np.array([[0, 4095], [40000, 65535]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode in ("I;16", "I")
    np.testing.assert_allclose(read_image(tmp_path / "i16.png"), arr / 65535, atol=1e-7)


@pytest.mark.parametrize("kwargs,name", [({"photometric": "ycbcr"}, "YCbCr TIFF without JPEG compression"),
                                         ({"photometric": "separated"}, "photometric SEPARATED is not supported")])
def test_unsupported_photometric_is_refused(tmp_path, kwargs, name):
    samples = 4 if kwargs["photometric"] == "separated" else 3
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 4, samples), np.uint8), **kwargs)
    with pytest.raises(ImageReadError, match=rf"c\.tif: {name}"):
        read_image(tmp_path / "c.tif")


# 4. samples: colour only when the photometric says so ----------------------------------------------------------------

STACK = np.stack([RAMP, 255 - RAMP, RAMP // 2])
ZSTACK_MSG = (r"3 planes with photometric MINISBLACK: a z-stack or multi-channel image; emclip reads single 2-D "
              r"images — export one plane")


@pytest.mark.parametrize("layout", ["separate", "contig"])
def test_three_gray_samples_are_a_stack_not_rgb(tmp_path, layout):
    data = STACK if layout == "separate" else np.moveaxis(STACK, 0, -1)
    tifffile.imwrite(tmp_path / "z.tif", data, photometric="minisblack", planarconfig=layout)
    with pytest.raises(ImageReadError, match=r"z\.tif: " + ZSTACK_MSG):
        read_image(tmp_path / "z.tif")
    with pytest.raises(ImageReadError, match=ZSTACK_MSG):
        probe_image(tmp_path / "z.tif")


@pytest.mark.parametrize("kwargs", [{"imagej": True}, {"photometric": "minisblack"}])
def test_imagej_and_shaped_three_slice_stacks_are_refused(tmp_path, kwargs):
    tifffile.imwrite(tmp_path / "z.tif", STACK, **kwargs)       # 3 pages of (6, 8)
    with pytest.raises(ImageReadError, match=r"z\.tif: TIFF has 3 pages \(3 full-resolution; a z-stack"):
        read_image(tmp_path / "z.tif")


def test_single_page_imagej_stack_is_refused(tmp_path):
    """ImageJ writes big stacks as one IFD plus 'images=N' in the description and the planes back to back."""
    tifffile.imwrite(tmp_path / "ij.tif", STACK[0], description="ImageJ=1.11a\nimages=3\nslices=3\n", metadata=None)
    with open(tmp_path / "ij.tif", "ab") as fh:                # the strip ends the file: append planes 2 and 3
        fh.write(STACK[1:].tobytes())
    with tifffile.TiffFile(tmp_path / "ij.tif") as tif:
        assert len(tif.pages) == 1
    with pytest.raises(ImageReadError, match=r"ij\.tif: TIFF holds 3 planes \(axes ZYX, shape \(3, 6, 8\)\); a z-stack"):
        read_image(tmp_path / "ij.tif")


def test_planar_and_contig_rgb_and_gray_alpha_still_read(tmp_path):
    rgb = np.moveaxis(STACK, 0, -1)
    tifffile.imwrite(tmp_path / "contig.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", STACK, photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "planar.tif", color="rgb"), rgb / 255, atol=1e-7)
    np.testing.assert_allclose(read_image(tmp_path / "contig.tif"), (rgb / 255) @ LUMA, atol=1e-6)
    gray_alpha = np.stack([RAMP, np.full_like(RAMP, 255)], -1)
    tifffile.imwrite(tmp_path / "ga.tif", gray_alpha, photometric="minisblack", extrasamples=["unassalpha"])
    np.testing.assert_allclose(read_image(tmp_path / "ga.tif"), RAMP / 255, atol=1e-7)


# 5. pages ------------------------------------------------------------------------------------------------------------

def test_multipage_tiff_is_refused(tmp_path):
    with tifffile.TiffWriter(tmp_path / "m.tif") as tw:
        tw.write(RAMP)
        tw.write(255 - RAMP)
    with pytest.raises(ImageReadError, match=r"m\.tif: TIFF has 2 pages \(2 full-resolution; .* export one plane"):
        read_image(tmp_path / "m.tif")


def test_thumbnail_page_and_pyramid_levels_read_the_full_resolution_image(tmp_path):
    big = (np.arange(32 * 40) % 256).astype(np.uint8).reshape(32, 40)
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tw:
        tw.write(big)
        tw.write(big[::4, ::4], subfiletype=1)                   # a reduced-resolution (thumbnail) page
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as tw:
        tw.write(big, subifds=2)
        tw.write(big[::2, ::2], subfiletype=1)
        tw.write(big[::4, ::4], subfiletype=1)
    for name in ("thumb.tif", "pyramid.tif"):
        np.testing.assert_allclose(read_image(tmp_path / name), big / 255, atol=1e-7)
        assert probe_image(tmp_path / name)[:2] == (32, 40)


# 6. orientation ------------------------------------------------------------------------------------------------------

def test_tiff_orientation_tag_is_applied(tmp_path):
    arr = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    expected = {3: [[60, 50, 40], [30, 20, 10]],              # rotated 180
                6: [[40, 10], [50, 20], [60, 30]]}           # stored rotated: displayed 90 degrees clockwise
    for value, want in expected.items():
        tifffile.imwrite(tmp_path / f"o{value}.tif", arr, extratags=[(274, "H", 1, value, True)])
        np.testing.assert_allclose(read_image(tmp_path / f"o{value}.tif"), np.array(want) / 255, atol=1e-7)
    assert probe_image(tmp_path / "o6.tif")[:2] == (3, 2)


def test_all_eight_tiff_orientations_agree_with_pillow_exif_transpose(tmp_path):
    arr = (np.arange(12) * 20).astype(np.uint8).reshape(3, 4)
    for value in range(1, 9):
        tifffile.imwrite(tmp_path / f"o{value}.tif", arr, extratags=[(274, "H", 1, value, True)])
        exif = Image.Exif()
        exif[0x0112] = value
        Image.fromarray(arr).save(tmp_path / f"o{value}.png", exif=exif)
        np.testing.assert_array_equal(read_image(tmp_path / f"o{value}.tif"), read_image(tmp_path / f"o{value}.png"),
                                      err_msg=f"orientation {value}")


def test_exif_orientation_is_applied_to_jpeg_and_png(tmp_path):
    arr = np.zeros((16, 24), np.uint8)
    arr[:8, :8] = 255                                           # bright top-left block
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif, quality=95)
    Image.fromarray(arr).save(tmp_path / "o.png", exif=exif)
    jpg, png = read_image(tmp_path / "o.jpg"), read_image(tmp_path / "o.png")
    assert jpg.shape == png.shape == (24, 16)
    np.testing.assert_allclose(png, np.rot90(arr, -1) / 255, atol=1e-7)   # the block is now top-right
    assert jpg[:8, -8:].mean() > 0.9 and jpg[:8, :8].mean() < 0.1
    assert probe_image(tmp_path / "o.jpg") == (24, 16, "L", "JPEG")


def test_invalid_orientation_is_ignored_with_a_warning(tmp_path):
    tifffile.imwrite(tmp_path / "o.tif", RAMP, extratags=[(274, "H", 1, 9, True)])
    with pytest.warns(ImageReadWarning, match=r"o\.tif: invalid orientation 9 ignored"):
        np.testing.assert_allclose(read_image(tmp_path / "o.tif"), RAMP / 255, atol=1e-7)


# 7. size guards, from the header --------------------------------------------------------------------------------------

def test_tiff_declaring_20000_squared_is_refused_before_decoding(tmp_path, no_decoding):
    path = _tiff_declaring(tmp_path / "huge.tif", 20000, 20000)
    assert path.stat().st_size < 2000
    msg = r"huge\.tif: 20000 x 20000 = 400,000,000 pixels \(~1\.6 GB as float32\) exceeds the limit of 268,435,456"
    with pytest.raises(ImageReadError, match=msg):
        read_image(path)
    with pytest.raises(ImageReadError, match=msg):
        probe_image(path)


def test_png_of_2_by_200000_is_refused_by_aspect_before_decoding(tmp_path, no_decoding):
    Image.fromarray(np.zeros((2, 200000), np.uint8)).save(tmp_path / "strip.png")
    msg = r"strip\.png: aspect ratio 100000:1 exceeds 20:1 \(200000 x 2 pixels\)"
    with pytest.raises(ImageReadError, match=msg):
        read_image(tmp_path / "strip.png")
    with pytest.raises(ImageReadError, match=msg):
        probe_image(tmp_path / "strip.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side,match", [(20000, "exceeds the limit of 268,435,456 pixels"),
                                        (100000, "too large to decode")])
def test_png_header_declaring_a_huge_image_is_refused(tmp_path, no_decoding, side, match):
    path = _png_declaring(tmp_path / "bomb.png", side, side)
    assert path.stat().st_size < 100
    with pytest.raises(ImageReadError, match=rf"bomb\.png: .*{match}"):
        read_image(path)


def test_pixel_limit_is_overridable(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "a.tif", RAMP)                   # 48 pixels
    assert MAX_PIXELS == 2 ** 28
    monkeypatch.setenv("EMCLIP_MAX_PIXELS", "40")
    with pytest.raises(ImageReadError, match=r"a\.tif: 8 x 6 = 48 pixels .* exceeds the limit of 40 pixels"):
        read_image(tmp_path / "a.tif")
    assert read_image(tmp_path / "a.tif", max_pixels=48).shape == (6, 8)
    monkeypatch.setenv("EMCLIP_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="EMCLIP_MAX_PIXELS='lots' is not a number"):
        read_image(tmp_path / "a.tif")
    monkeypatch.delenv("EMCLIP_MAX_PIXELS")
    monkeypatch.setenv("EMCLIP_MAX_ASPECT", "1.2")
    with pytest.raises(ImageReadError, match=r"aspect ratio 1\.33:1 exceeds 1\.2:1"):
        probe_image(tmp_path / "a.tif")


def test_cohort_header_check_decodes_nothing_and_decode_check_refuses_from_the_header(cohort_copy, monkeypatch):
    images = pd.read_csv(cohort_copy / "images.csv", dtype=str, keep_default_na=False)
    _tiff_declaring(cohort_copy / images.path[0], 20000, 20000)
    tifffile.imwrite(cohort_copy / images.path[1], STACK, photometric="minisblack", planarconfig="separate")
    row1, row2 = (f"images.csv, row {i} (patient {images.patient_id[i - 1]}): " for i in (1, 2))
    _, problems = validate_cohort(cohort_copy, check_images="decode")
    problems = [str(p) for p in problems]
    assert any(p.startswith(row1) and "exceeds the limit of 268,435,456 pixels" in p for p in problems), problems
    assert any(p.startswith(row2) and "3 planes with photometric MINISBLACK" in p for p in problems), problems

    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    _, header_problems = validate_cohort(cohort_copy, check_images="header")
    assert [str(p) for p in header_problems if "row 1 " in str(p) or "row 2 " in str(p)] == problems[:2]
    assert not any("decoded" in str(p) for p in header_problems)
    assert probe_image(cohort_copy / images.path[2]) == (48, 48, "uint8", "TIFF")


# 8. file-level hostility ---------------------------------------------------------------------------------------------

def _damaged(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    os.symlink("loop.tif", tmp_path / "loop.tif")
    os.symlink("nowhere.tif", tmp_path / "dangling.tif")
    (tmp_path / "dir.tif").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.tif").write_bytes((tmp_path / "ok.tif").read_bytes()[:5000])
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:2000])
    Image.fromarray(RAMP).save(tmp_path / "gif.png", format="GIF")
    return {"loop.tif": "symlink loop", "dangling.tif": r"broken symlink \(its target does not exist\)",
            "dir.tif": "is a directory, not an image file", "empty.png": r"empty file \(0 bytes\)",
            "cut.tif": "cannot decode image", "cut.png": "cannot decode image",
            "gif.png": r"cannot decode image \(not a TIFF, PNG or JPEG file\)", "nope.tif": "file not found"}


def test_loops_directories_empty_truncated_and_foreign_files_are_refused(tmp_path):
    for name, why in _damaged(tmp_path).items():
        with pytest.raises(ImageReadError, match=rf"{name}: {why}") as err:
            read_image(tmp_path / name)
        assert "\n" not in str(err.value)
        if not name.startswith("cut"):                            # truncated pixel data is only found by decoding
            with pytest.raises(ImageReadError, match=rf"{name}: {why}"):
                probe_image(tmp_path / name)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.tif")
    with pytest.raises(ImageReadError, match=r"pipe\.tif: not a regular file"):
        read_image(tmp_path / "pipe.tif")


def test_content_decides_the_format_not_the_suffix(tmp_path):
    tifffile.imwrite(tmp_path / "tiff.png", RAMP, photometric="miniswhite")
    np.testing.assert_allclose(read_image(tmp_path / "tiff.png"), 1 - RAMP / 255, atol=1e-7)
    Image.fromarray(RAMP).save(tmp_path / "png.tif", format="PNG")
    np.testing.assert_allclose(read_image(tmp_path / "png.tif"), RAMP / 255, atol=1e-7)


def test_cohort_with_a_symlink_loop_reports_it(cohort_copy):
    images = pd.read_csv(cohort_copy / "images.csv", dtype=str, keep_default_na=False)
    target = cohort_copy / images.path[3]
    target.unlink()
    os.symlink(target.name, target)
    for level in ("exists", "header", "decode"):
        cohort, problems = validate_cohort(cohort_copy, check_images=level)   # used to raise RuntimeError
        assert cohort is None
        assert any(str(p).startswith(f"images.csv, row 4 (patient {images.patient_id[3]}): ") and
                   str(p).endswith(": symlink loop") for p in problems), problems
