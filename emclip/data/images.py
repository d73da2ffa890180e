"""Image IO and the one place where the resize/crop policy and intensity scaling are decided.

Policy (stated once, used everywhere):

* **Reading**: one 2-D image per file: TIFF, PNG or JPEG, told apart by the file's first bytes (the suffix is not
  trusted). Every image is either read correctly or refused with an :class:`ImageReadError` whose one-line message
  names the file and the problem; the few documented repairs emit an :class:`ImageReadWarning` naming the file.

  - *Files*: a missing path, a symlink loop or dangling symlink, a directory, a non-regular file (FIFO, device),
    a 0-byte, truncated or corrupt file are refused.
  - *Size guards, checked from the header before any pixel is decoded*: more than ``MAX_PIXELS`` = 2**28 pixels
    (16384 x 16384, the largest EM frames; override with ``max_pixels=`` or the ``EMCLIP_MAX_PIXELS`` environment
    variable) or a long:short side ratio above ``MAX_ASPECT`` = 20 (``max_aspect=`` / ``EMCLIP_MAX_ASPECT``) are
    refused. Pillow's own decompression-bomb limit is raised to the limit in force when it is lower, so these
    guards decide. :func:`probe_image` applies every header check without decoding (``check --images header``).
  - *TIFF pages*: exactly one full-resolution page. Reduced-resolution pages (thumbnails, pyramid levels, flagged
    by NewSubfileType) and transparency masks are ignored, pyramid levels in SubIFDs are never read, so a pyramid
    reads its full-resolution level. Two or more full-resolution pages (a z-stack, time series or multi-page
    file), or a single page whose metadata declares several planes (ImageJ hyperstack, MetaMorph STK), are
    refused: emclip reads single 2-D images, export one plane. Animated PNGs are refused likewise; an MPO JPEG
    reads its primary image.
  - *TIFF PhotometricInterpretation decides colour*, never the array shape: MINISBLACK and MINISWHITE are gray with
    one sample per pixel (a second sample is dropped only when ExtraSamples marks it as alpha); MINISWHITE is
    inverted so that dark stays dark. Several samples with a gray photometric are a z-stack or multi-channel
    image and are refused. RGB (first three samples; alpha dropped) and JPEG-compressed YCbCr (decoded to RGB)
    are colour. PALETTE images are mapped through their colormap to RGB (a colormap whose entries are all <= 255
    is taken as 8-bit, otherwise 16-bit). Other photometrics (CMYK, CIELab, CFA, masks, ...) are refused.
  - *Orientation*: the TIFF Orientation tag and the EXIF orientation of JPEG/PNG are applied (all 8 values), so
    the array is the image as displayed; an invalid value is ignored with a warning.
  - *Pillow modes*: L, I;16 and F are read as stored, 1 becomes 0/255, LA drops alpha, P/PA (palette) and
    RGBA/CMYK/YCbCr become RGB; a 32-bit "I" image whose values fit 0..65535 is 16-bit.
* **Intensity** (``intensity="dtype"``, the default) depends on the sample type:

  - unsigned 8- and 16-bit integers (and 1-bit) are divided by the largest value their bit depth allows
    (255, 65535; 4095 for a 12-bit TIFF), so 16-bit files keep their full precision in float32;
  - signed integers of any width and 32/64-bit unsigned integers are min-max scaled by the image's own range:
    no detector fills the range of those dtypes, so dividing by it would make every image a near-constant;
  - floats already within [0, 1] are kept, other floats are min-max scaled. NaN and +/-inf are ignored when
    computing the range and set to 0 after scaling (with a warning); an image without a finite value is refused.

  A constant image reads as zeros wherever it is scaled by its own range. ``intensity="percentile"`` instead
  stretches the 0.5-99.5 percentiles (of the finite values) to [0, 1], for archives whose 16-bit files use only
  12 or 14 bits.
* **Colour**: EM is grayscale. RGB files are converted to luminance by default (``color="gray"``) and the gray
  channel is repeated for 3-channel towers; ``color="rgb"`` keeps colour.
* **Geometry**: ``policy="resize"`` (default) scales the shorter side to the tower's input size with antialiasing
  and centre-crops the square; the image's *effective* scale becomes ``nm_per_pixel * short_side / size``, and it
  is the effective scale that the model's scale embedding receives. ``policy="crop"`` takes a native-resolution
  crop (centre, or random with a generator), keeping ``nm_per_pixel`` unchanged; smaller images are reflect-padded.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from . import resample

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
MAX_PIXELS = 2 ** 28          # 16384 x 16384; EMCLIP_MAX_PIXELS overrides
MAX_ASPECT = 20.0             # long side : short side; EMCLIP_MAX_ASPECT overrides
_MAX_TIFF_PAGES = 64          # more pages than this is a stack whatever their flags say; not inspected one by one
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")   # classic and BigTIFF, both byte orders
_PIL_FORMATS = ("PNG", "JPEG")          # JPEG includes MPO (read as its primary image)
_PIL_AS_IS = {"L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "RGB"}
_PIL_TO_GRAY = {"1", "LA", "La"}
_PIL_TO_RGB = {"P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
_PH = tifffile.PHOTOMETRIC
_ALPHA = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
_STACK_HINT = "emclip reads single 2-D images — export one plane"


class ImageReadError(RuntimeError):
    """An image file that is missing, unreadable, corrupt or refused by the reading policy; the message names the
    file and the problem on one line."""


class ImageReadWarning(UserWarning):
    """An image read with a documented repair (e.g. NaN pixels set to 0); the message names the file."""


class ImageInfo(NamedTuple):
    """What :func:`probe_image` learns from a header: the size as :func:`read_image` returns it (orientation
    applied), the stored sample type (numpy dtype name for TIFF, Pillow mode for PNG/JPEG) and the format."""
    height: int
    width: int
    dtype: str
    format: str


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _limit(value, env: str, default, cast, minimum):
    if value is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            return default
        try:
            value = cast(float(raw))
        except (ValueError, OverflowError):
            raise ValueError(f"{env}={raw!r} is not a number") from None
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"image size limit {env.removeprefix('EMCLIP_').lower()} must be >= {minimum}, got {value!r}")
    return value


def _limits(max_pixels, max_aspect) -> tuple[int, float]:
    return (_limit(max_pixels, "EMCLIP_MAX_PIXELS", MAX_PIXELS, int, 1),
            _limit(max_aspect, "EMCLIP_MAX_ASPECT", MAX_ASPECT, float, 1.0))


def check_file(path: str | Path) -> os.stat_result:
    """Check that ``path`` is a non-empty regular file (following symlinks); returns its ``os.stat`` result.

    Raises :class:`ImageReadError` naming the file: file not found, broken symlink, symlink loop, permission denied,
    a directory, a FIFO/socket/device, or an empty file."""
    try:
        st = os.stat(path)
    except ValueError as err:                       # e.g. an embedded NUL byte
        raise ImageReadError(f"{path}: invalid path ({err})") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            why = "symlink loop"
        elif err.errno in (errno.ENOENT, errno.ENOTDIR):
            why = "broken symlink (its target does not exist)" if os.path.islink(path) else "file not found"
        elif err.errno in (errno.EACCES, errno.EPERM):
            why = "permission denied"
        else:
            why = f"cannot access file ({_one_line(err)})"
        raise ImageReadError(f"{path}: {why}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{path}: not a regular file (a FIFO, socket or device)")
    if st.st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    return st


def _check_geometry(path: Path, height: int, width: int, max_pixels: int, max_aspect: float) -> None:
    if height < 1 or width < 1:
        raise ImageReadError(f"{path}: empty image ({width} x {height} pixels)")
    if height * width > max_pixels:
        gb = height * width * 4 / 1e9
        raise ImageReadError(f"{path}: {width} x {height} = {height * width:,} pixels (~{gb:.1f} GB as float32) "
                             f"exceeds the limit of {max_pixels:,} pixels (EMCLIP_MAX_PIXELS)")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect:
        shown = f"{ratio:.0f}" if ratio >= 100 else f"{ratio:.3g}"
        raise ImageReadError(f"{path}: aspect ratio {shown}:1 exceeds {max_aspect:g}:1 ({width} x {height} pixels)")


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError as err:
        raise ImageReadError(f"{path}: cannot open file ({_one_line(err)})") from None


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply a TIFF/EXIF orientation (1-8) to the first two axes, giving the image as displayed."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


_SINK = threading.local()   # per thread: check collects each file's warnings for its summary (thread-safe)


@contextlib.contextmanager
def collect_image_warnings():
    """Within the block, this thread's :class:`ImageReadWarning` messages are appended to the yielded list instead
    of being issued (``check`` reads files in threads and reports each file's warnings with its row)."""
    previous, _SINK.notes = getattr(_SINK, "notes", None), []
    try:
        yield _SINK.notes
    finally:
        _SINK.notes = previous


def _warn(message: str, stacklevel: int) -> None:
    notes = getattr(_SINK, "notes", None)
    if notes is not None:
        notes.append(message)
    else:
        warnings.warn(message, ImageReadWarning, stacklevel=stacklevel + 1)


def _valid_orientation(path: Path, value) -> int:
    if value is None or value == 1:
        return 1
    if isinstance(value, (int, np.integer)) and 2 <= int(value) <= 8:
        return int(value)
    _warn(f"{path}: invalid orientation {value!r} ignored (read as stored)", stacklevel=4)
    return 1


class _TiffPlan(NamedTuple):
    page: tifffile.TiffPage
    kind: str            # "gray", "rgb" or "palette"
    invert: bool         # MINISWHITE
    orientation: int
    height: int          # as read, orientation applied
    width: int


def _photometric_name(value) -> str:
    try:
        return _PH(value).name
    except ValueError:
        return str(value)


def _tiff_plan(path: Path, tif: tifffile.TiffFile, max_pixels: int, max_aspect: float) -> _TiffPlan:
    """Every decision about a TIFF, taken from its tags alone (nothing is decoded)."""
    n = len(tif.pages)
    if n == 0:
        raise ImageReadError(f"{path}: TIFF contains no image")
    if n > _MAX_TIFF_PAGES:
        raise ImageReadError(f"{path}: TIFF has {n} pages (a z-stack, time series or multi-page file); "
                             f"{_STACK_HINT}")
    pages = [tif.pages[i] for i in range(n)]
    full = [p for p in pages if not (p.is_reduced or p.is_mask)]
    if not full:
        raise ImageReadError(f"{path}: TIFF has only reduced-resolution or mask pages")
    if len(full) > 1:
        raise ImageReadError(f"{path}: TIFF has {n} pages ({len(full)} full-resolution; a z-stack, time series or "
                             f"multi-page file); {_STACK_HINT}")
    page = full[0]
    if n == 1 and tif.series:   # one page, several planes by metadata (ImageJ hyperstack, MetaMorph STK, ...)
        series = tif.series[0]
        planes = math.prod(s for s, ax in zip(series.shape, series.axes) if ax not in "YXS")
        if planes > 1:
            raise ImageReadError(f"{path}: TIFF holds {planes} planes (axes {series.axes}, shape "
                                 f"{tuple(series.shape)}); a z-stack or multi-channel image; {_STACK_HINT}")
    if page.imagedepth > 1:
        raise ImageReadError(f"{path}: volumetric TIFF (ImageDepth {page.imagedepth}); {_STACK_HINT}")
    if page.dtype is None or np.dtype(page.dtype).kind not in "biuf":
        raise ImageReadError(f"{path}: unsupported TIFF sample format ({page.bitspersample}-bit, "
                             f"SampleFormat {int(page.sampleformat)})")
    photometric, samples = page.photometric, page.samplesperpixel
    name = _photometric_name(photometric)
    invert = False
    if photometric in (_PH.RGB, _PH.YCBCR):
        if samples < 3:
            raise ImageReadError(f"{path}: photometric {name} with {samples} sample(s) per pixel")
        if photometric == _PH.YCBCR and page.compression not in (6, 7):
            raise ImageReadError(f"{path}: YCbCr TIFF without JPEG compression is not supported (its samples would "
                                 f"be read as RGB); save it as RGB")
        kind = "rgb"
    elif photometric in (_PH.MINISBLACK, _PH.MINISWHITE):
        gray_alpha = samples == 2 and len(page.extrasamples) == 1 and page.extrasamples[0] in _ALPHA
        if samples != 1 and not gray_alpha:
            raise ImageReadError(f"{path}: {samples} planes with photometric {name}: a z-stack or multi-channel "
                                 f"image; {_STACK_HINT}")
        kind, invert = "gray", photometric == _PH.MINISWHITE
    elif photometric == _PH.PALETTE:
        cmap = page.colormap
        if samples != 1 or cmap is None or cmap.ndim != 2 or cmap.shape[0] != 3:
            raise ImageReadError(f"{path}: palette TIFF without a valid colormap")
        kind = "palette"
    else:
        raise ImageReadError(f"{path}: photometric {name} is not supported (emclip reads MINISBLACK, MINISWHITE, "
                             f"RGB, JPEG YCbCr and PALETTE TIFFs)")
    orientation = _valid_orientation(path, page.tags.valueof(274))
    height, width = page.imagelength, page.imagewidth
    if orientation >= 5:
        height, width = width, height
    _check_geometry(path, height, width, max_pixels, max_aspect)
    return _TiffPlan(page, kind, invert, orientation, height, width)


def _page_pixels(page: tifffile.TiffPage, mapped: bool) -> np.ndarray:
    """The page's samples; with ``mapped``, an uncompressed page stored in final form is memory-mapped instead of
    copied (the loader reads each sample once, so a copy would only cost time). A page whose data would extend past
    the end of the file is read the ordinary way, so that it fails as :func:`read_image` fails."""
    if mapped and page.is_memmappable and page.dataoffsets[0] + page.nbytes <= page.parent.filehandle.size:
        return page.asarray(out="memmap").view(np.ndarray)
    return page.asarray()


def _read_tiff(path: Path, max_pixels: int, max_aspect: float,
               mapped: bool = False) -> tuple[np.ndarray, int | None, bool]:
    """(array H x W or H x W x 3, the bit depth unsigned samples are scaled by, invert) of a TIFF."""
    with tifffile.TiffFile(path) as tif:
        plan = _tiff_plan(path, tif, max_pixels, max_aspect)
        page = plan.page
        arr = _page_pixels(page, mapped)
        if "S" in page.axes and arr.ndim == len(page.axes):   # samples last, wherever the file stored them
            arr = np.moveaxis(arr, page.axes.index("S"), -1)
        if plan.kind == "gray" and arr.ndim == 3:
            arr = arr[..., 0]                                   # gray + alpha: the alpha sample is dropped
        elif plan.kind == "rgb":
            arr = arr[..., :3]
        elif plan.kind == "palette":
            cmap = np.asarray(page.colormap)
            index = arr.astype(np.uint8) if arr.dtype == bool else arr
            if index.size and int(index.max()) >= cmap.shape[1]:
                raise ImageReadError(f"{path}: palette index {int(index.max())} beyond the colormap's "
                                     f"{cmap.shape[1]} entries")
            lut = cmap.T.astype(np.float32) / (255.0 if cmap.max(initial=0) <= 255 else 65535.0)
            arr = lut[index]                                   # H x W x 3 in [0, 1]
        bits = int(page.bitspersample) if arr.dtype.kind == "u" else None
    return _orient(arr, plan.orientation), bits, plan.invert


def _open_pil(path: Path, max_pixels: int, max_aspect: float) -> Image.Image:
    """Open a PNG/JPEG lazily and apply the header checks; the caller closes it."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels          # never stricter than ours: our guard, with its message, decides
    try:
        im = Image.open(path, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{path}: too large to decode ({_one_line(err)}; limit {max_pixels:,} pixels, "
                             f"EMCLIP_MAX_PIXELS)") from None
    except Exception as err:  # noqa: BLE001
        why = "not a TIFF, PNG or JPEG file" if isinstance(err, Image.UnidentifiedImageError) else _one_line(err)
        raise ImageReadError(f"{path}: cannot decode image ({why})") from None
    try:
        frames = int(getattr(im, "n_frames", 1))
        if im.format == "PNG" and frames > 1:
            raise ImageReadError(f"{path}: animated PNG with {frames} frames; {_STACK_HINT}")
        width, height = im.size
        _check_geometry(path, height, width, max_pixels, max_aspect)
    except BaseException:
        im.close()
        raise
    return im


def _read_pil(path: Path, max_pixels: int, max_aspect: float) -> np.ndarray:
    with _open_pil(path, max_pixels, max_aspect) as im:
        im.load()
        orientation = _valid_orientation(path, im.getexif().get(0x0112))
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        if im.mode in _PIL_TO_GRAY:
            im = im.convert("L")
        elif im.mode in _PIL_TO_RGB:
            im = im.convert("RGB")
        elif im.mode not in _PIL_AS_IS:
            raise ImageReadError(f"{path}: Pillow image mode {im.mode!r} is not supported")
        arr = np.asarray(im)
    if im.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:   # 16-bit PNGs may decode as "I"
        arr = arr.astype(np.uint16)
    return arr


def probe_image(path: str | Path, *, max_pixels: int | None = None, max_aspect: float | None = None) -> ImageInfo:
    """Validate an image from its header alone, without decoding pixels: the file checks, the size guards and,
    for TIFF, the page/photometric/sample decisions of :func:`read_image`. Returns :class:`ImageInfo`.

    Truncated or corrupt pixel data is only found by decoding (:func:`read_image`). The size of a PNG whose EXIF
    chunk follows the pixel data is reported as stored (its orientation is only known after decoding)."""
    path = Path(path)
    check_file(path)
    max_pixels, max_aspect = _limits(max_pixels, max_aspect)
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                plan = _tiff_plan(path, tif, max_pixels, max_aspect)
                return ImageInfo(plan.height, plan.width, np.dtype(plan.page.dtype).name, "TIFF")
        with _open_pil(path, max_pixels, max_aspect) as im:
            width, height = im.size
            exif = Image.Exif()
            if im.format != "PNG":
                exif = im.getexif()                 # JPEG: from the APP1 header
            elif "exif" in im.info:                 # PNG: only an eXIf chunk before the pixel data, no decoding
                exif.load(im.info["exif"])
            if _valid_orientation(path, exif.get(0x0112)) >= 5:
                height, width = width, height
            return ImageInfo(height, width, im.mode, "JPEG" if im.format == "MPO" else im.format)
    except ImageReadError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure means the file is unusable
        raise ImageReadError(f"{path}: cannot decode image ({_one_line(err)})") from err


def _intensity_range(arr: np.ndarray, values: np.ndarray, intensity: str,
                     bits: int | None) -> tuple[float, float, float]:
    """(lo, hi, span) of the map v -> clip((v - lo) / span, 0, 1) by the policy in the module docstring; ``values``
    are the finite samples of ``arr`` (its dtype decides the rule). Shared by both read paths."""
    kind = arr.dtype.kind
    if intensity == "percentile":
        lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        span = max(hi - lo, 1e-6)
    elif kind == "u" and arr.dtype.itemsize <= 2:        # 8/16-bit unsigned: the bit depth's full scale
        depth = bits if bits and bits < 8 * arr.dtype.itemsize else 8 * arr.dtype.itemsize
        lo, span = 0.0, float(2 ** depth - 1)
        hi = span
    else:                                                # signed / 32-64-bit ints and floats: the image's own range
        lo, hi = float(values.min()), float(values.max())
        if kind == "f" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        span = hi - lo
    return lo, hi, span


def _to_unit_float(arr: np.ndarray, intensity: str, path: Path, bits: int | None = None,
                   invert: bool = False) -> np.ndarray:
    """Scale samples to float32 [0, 1] by the policy in the module docstring."""
    if arr.dtype == bool:
        arr, bits = arr.astype(np.uint8) * 255, None
    kind = arr.dtype.kind
    if kind not in "iuf":
        raise ImageReadError(f"{path}: unsupported sample type {arr.dtype}")
    finite, n_bad = None, 0
    if kind == "f":
        finite = np.isfinite(arr)
        n_bad = arr.size - int(np.count_nonzero(finite))
        if n_bad == arr.size:
            raise ImageReadError(f"{path}: no finite pixel value (all {arr.size} are NaN or inf)")
        if n_bad == 0:
            finite = None
    values = arr if finite is None else arr[finite]
    wide = arr.dtype.itemsize > 4 or (kind in "iu" and arr.dtype.itemsize == 4)
    work = np.float64 if wide else np.float32
    lo, hi, span = _intensity_range(arr, values, intensity, bits)
    out = arr.astype(work)
    if math.isfinite(span):
        out -= lo
    else:                                                # float64 extremes (span overflows): scale the halves
        out /= 2
        out -= lo / 2
        span = hi / 2 - lo / 2
    if span > 0:
        out /= span
    else:
        out.fill(0.0)
    out = np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
    if invert:
        np.subtract(1.0, out, out=out)
    if finite is not None:
        out[~finite] = 0.0
        _warn(f"{path}: {n_bad} of {arr.size} pixel values are NaN or inf; ignored for the intensity range and set "
              f"to 0", stacklevel=3)
    return out


def read_image(path: str | Path, intensity: str = "dtype", color: str = "gray", *, max_pixels: int | None = None,
               max_aspect: float | None = None) -> np.ndarray:
    """Read one image as float32 in [0, 1]: (H, W) when ``color="gray"``, (H, W, 3) when ``color="rgb"``.

    Follows the reading policy of the module docstring: anything else raises :class:`ImageReadError` naming the
    file; ``max_pixels`` / ``max_aspect`` override ``MAX_PIXELS`` / ``MAX_ASPECT`` (and their environment
    variables) for this call."""
    path = Path(path)
    arr, bits, invert = _decode(path, intensity, color, max_pixels, max_aspect)
    return _unit_image(arr, path, intensity, color, bits, invert)


def _decode(path: Path, intensity: str, color: str, max_pixels, max_aspect,
            mapped: bool = False) -> tuple[np.ndarray, int | None, bool]:
    """Every check and decision of :func:`read_image` up to the raw samples: (array as displayed, H x W or
    H x W x 3, in its stored dtype; bit depth of unsigned samples or None; invert)."""
    if intensity not in ("dtype", "percentile"):
        raise ValueError(f"intensity must be 'dtype' or 'percentile', got {intensity!r}")
    if color not in ("gray", "rgb"):
        raise ValueError(f"color must be 'gray' or 'rgb', got {color!r}")
    check_file(path)
    max_pixels, max_aspect = _limits(max_pixels, max_aspect)
    bits, invert = None, False
    try:
        if _is_tiff(path):
            arr, bits, invert = _read_tiff(path, max_pixels, max_aspect, mapped)
        else:
            arr = _read_pil(path, max_pixels, max_aspect)
    except ImageReadError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure means the file is unusable
        raise ImageReadError(f"{path}: cannot decode image ({_one_line(err)})") from err
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3) or min(arr.shape[:2]) < 1:
        raise ImageReadError(f"{path}: unsupported image shape {arr.shape} (expected H x W or H x W x 3)")
    return arr, bits, invert


def _unit_image(arr: np.ndarray, path: Path, intensity: str, color: str, bits: int | None,
                invert: bool) -> np.ndarray:
    img = _to_unit_float(arr, intensity, path, bits, invert)
    if color == "gray" and img.ndim == 3:
        img = img @ LUMA
    elif color == "rgb" and img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img, dtype=np.float32)


class ImageTransform:
    """Array from :func:`read_image` -> normalised tensor (C, size, size) plus the geometric zoom applied.

    ``zoom`` is source pixels per output pixel; multiply ``nm_per_pixel`` by it to get the effective scale.
    """

    def __init__(self, image_size: int = 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels: int = 3,
                 policy: str = "resize"):
        if policy not in ("resize", "crop"):
            raise ValueError(f"policy must be 'resize' or 'crop', got {policy!r}")
        self.image_size, self.channels, self.policy = int(image_size), int(channels), policy
        self.mean = torch.tensor(mean[:channels], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std[:channels], dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_preprocess(cls, preprocess: dict, policy: str = "resize") -> "ImageTransform":
        """Build from a model's ``preprocess`` dict (image_size, mean, std, channels)."""
        return cls(preprocess["image_size"], tuple(preprocess["mean"]), tuple(preprocess["std"]),
                   preprocess.get("channels", 3), policy)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, float]:
        t = torch.from_numpy(img)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        size = self.image_size
        h, w = t.shape[-2:]
        zoom, resized, pad = self._layout(h, w)
        if resized is not None:
            t = F.interpolate(t[None], size=resized, mode="bilinear", antialias=True, align_corners=False)[0]
        elif pad is not None:   # reflect-pad small images so the crop keeps native resolution
            mode = "reflect" if pad[2] + pad[3] < h and pad[0] + pad[1] < w else "replicate"
            t = F.pad(t[None], pad, mode=mode)[0]
        top, left = self._crop_origin(t.shape[-2], t.shape[-1], rng)
        return self._finish(t[:, top:top + size, left:left + size]), float(zoom)

    def _layout(self, h: int, w: int) -> tuple[float, tuple[int, int] | None, tuple[int, int, int, int] | None]:
        """(zoom, (height, width) to resize to or None, padding (left, right, top, bottom) or None): the geometry
        before the crop, shared by :meth:`__call__` and :func:`load_transformed`."""
        size = self.image_size
        if self.policy == "resize":
            zoom = min(h, w) / size
            if min(h, w) == size:
                return zoom, None, None
            return zoom, (max(size, round(h / zoom)), max(size, round(w / zoom))), None
        if h < size or w < size:
            ph, pw = max(size - h, 0), max(size - w, 0)
            return 1.0, None, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        return 1.0, None, None

    def _crop_origin(self, h: int, w: int, rng: np.random.Generator | None) -> tuple[int, int]:
        """Top-left corner of the size x size crop of an h x w (resized or padded) image: the centre, or drawn
        from ``rng`` under ``policy="crop"``."""
        free_h, free_w = h - self.image_size, w - self.image_size
        if self.policy == "crop" and rng is not None:
            return int(rng.integers(free_h + 1)), int(rng.integers(free_w + 1))
        return free_h // 2, free_w // 2

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        """(1 or 3, size, size) in [0, 1] -> the tower's channels, normalised."""
        if t.shape[0] == 1 and self.channels == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 3 and self.channels == 1:
            t = (t * torch.from_numpy(LUMA).view(3, 1, 1)).sum(0, keepdim=True)
        return ((t - self.mean) / self.std).contiguous()


def load_transformed(path: str | Path, transform: ImageTransform, intensity: str = "dtype", color: str = "gray",
                     rng: np.random.Generator | None = None, *, max_pixels: int | None = None,
                     max_aspect: float | None = None) -> tuple[torch.Tensor, float]:
    """``transform(read_image(path, intensity, color), rng)`` in one pass: the same tensor and zoom (to float
    rounding) and the same refusals, errors and warnings, without the full-resolution float image.

    For integer samples of at most 16 bits (the EM norm) the intensity map is linear and clipping can only act where
    the bit depth or the percentiles leave room for it, so the raw samples (less the range's low end, clipped where
    needed) are resized and cropped first and the small result is scaled (:mod:`emclip.data.resample`);
    uncompressed TIFF pixels are memory-mapped, not copied. Everything else (floats, with their non-finite values;
    32/64-bit integers; palette and bilevel images; crops of images smaller than the crop) takes the
    ``read_image`` path."""
    path = Path(path)
    arr, bits, invert = _decode(path, intensity, color, max_pixels, max_aspect, mapped=True)
    h, w = arr.shape[:2]
    zoom, resized, pad = transform._layout(h, w)
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2 or pad is not None:
        return transform(_unit_image(arr, path, intensity, color, bits, invert), rng)
    lo, _, span = _intensity_range(arr, arr, intensity, bits)
    clips = intensity == "percentile" or (arr.dtype.kind == "u" and span < np.iinfo(arr.dtype).max)
    bounds = (0.0, span) if clips else None
    size = transform.image_size
    top, left = transform._crop_origin(*(resized or (h, w)), rng)
    if resized is not None:
        rows, cols = resample.bands(h, resized[0], top, size), resample.bands(w, resized[1], left, size)
    planes = []
    for plane in ([arr] if arr.ndim == 2 else [arr[..., c] for c in range(3)]):
        if resized is not None:
            v = resample.resize_plane(plane, rows, cols, lo, bounds)
        else:
            v = plane[top:top + size, left:left + size].astype(np.float32)
            v -= lo
            if bounds is not None:
                np.clip(v, *bounds, out=v)
        if span > 0:
            v /= span
        else:
            v.fill(0.0)
        if invert:
            np.subtract(1.0, v, out=v)
        planes.append(v)
    if color == "gray" and len(planes) == 3:
        planes = [np.stack(planes, -1) @ LUMA]
    elif color == "rgb" and len(planes) == 1:
        planes = planes * 3
    if len(planes) == 1 and transform.channels == 3:
        planes = planes * 3                      # the gray channel repeated, as _finish expands it
    if len(planes) != transform.channels:        # colour for a 1-channel tower: _finish's luminance, in torch
        return transform._finish(torch.from_numpy(np.stack(planes))), float(zoom)
    # _finish's (t - mean) / std in numpy (the same float32 operations): torch's elementwise ops would open an
    # OpenMP team of torch's full thread count in every loading thread
    out = np.empty((len(planes), size, size), np.float32)
    for c, (v, mean, std) in enumerate(zip(planes, transform.mean.flatten().numpy(), transform.std.flatten().numpy())):
        np.subtract(v, mean, out=out[c])
        np.divide(out[c], std, out=out[c])
    return torch.from_numpy(out), float(zoom)
