"""Image IO and the one place where the resize/crop policy and intensity scaling are decided.

Policy (stated once, used everywhere):

* **Reading**: TIFF (8/16-bit, grayscale or RGB, first page), PNG, JPEG. Integer data is divided by the maximum of
  its dtype, so 16-bit files keep their full precision in float32 (``intensity="dtype"``). ``intensity="percentile"``
  instead stretches the 0.5-99.5 percentiles to [0, 1], for archives whose 16-bit files use only 12 or 14 bits.
* **Colour**: EM is grayscale. RGB files are converted to luminance by default (``color="gray"``) and the gray
  channel is repeated for 3-channel towers; ``color="rgb"`` keeps colour.
* **Geometry**: ``policy="resize"`` (default) scales the shorter side to the tower's input size with antialiasing
  and centre-crops the square; the image's *effective* scale becomes ``nm_per_pixel * short_side / size``, and it
  is the effective scale that the model's scale embedding receives. ``policy="crop"`` takes a native-resolution
  crop (centre, or random with a generator), keeping ``nm_per_pixel`` unchanged; smaller images are reflect-padded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class ImageReadError(RuntimeError):
    """An image file that is missing, unreadable or corrupt; the message names the file."""


def _to_unit_float(arr: np.ndarray, intensity: str) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if intensity == "percentile":
        lo, hi = np.percentile(arr, [0.5, 99.5])
        out = (arr.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    elif np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        out = (arr.astype(np.float32) - info.min) / float(info.max - info.min)
    else:                                  # float files: already [0, 1], or min-max scaled when they are not
        out = arr.astype(np.float32)
        lo, hi = float(np.nanmin(out)), float(np.nanmax(out))
        if lo < 0 or hi > 1:
            out = (out - lo) / max(hi - lo, 1e-6)
    return np.clip(np.nan_to_num(out), 0.0, 1.0)


def read_image(path: str | Path, intensity: str = "dtype", color: str = "gray") -> np.ndarray:
    """Read one image as float32 in [0, 1]: (H, W) when ``color="gray"``, (H, W, 3) when ``color="rgb"``."""
    path = Path(path)
    if intensity not in ("dtype", "percentile"):
        raise ValueError(f"intensity must be 'dtype' or 'percentile', got {intensity!r}")
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path, key=0)
        else:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "LA", "RGBA", "CMYK", "YCbCr", "1"):
                    im = im.convert("RGB" if im.mode != "LA" else "L")
                arr = np.asarray(im)
                if im.mode == "I" and arr.max(initial=0) <= 65535:   # 16-bit PNGs often decode as int32 "I"
                    arr = arr.astype(np.uint16)
    except Exception as err:  # noqa: BLE001 - any decoder failure means the file is unusable
        raise ImageReadError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):   # planar TIFF -> channels last
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3) or min(arr.shape[:2]) < 1:
        raise ImageReadError(f"{path}: unsupported image shape {arr.shape} (expected H x W or H x W x 3)")
    img = _to_unit_float(arr, intensity)
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
        if self.policy == "resize":
            zoom = min(h, w) / size
            if min(h, w) != size:
                nh, nw = max(size, round(h / zoom)), max(size, round(w / zoom))
                t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
            top, left = (t.shape[-2] - size) // 2, (t.shape[-1] - size) // 2
        else:
            zoom = 1.0
            if h < size or w < size:   # reflect-pad small images so the crop keeps native resolution
                ph, pw = max(size - h, 0), max(size - w, 0)
                mode = "reflect" if ph < h and pw < w else "replicate"
                t = F.pad(t[None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)[0]
            free_h, free_w = t.shape[-2] - size, t.shape[-1] - size
            if rng is None:
                top, left = free_h // 2, free_w // 2
            else:
                top, left = int(rng.integers(free_h + 1)), int(rng.integers(free_w + 1))
        t = t[:, top:top + size, left:left + size]
        if t.shape[0] == 1 and self.channels == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 3 and self.channels == 1:
            t = (t * torch.from_numpy(LUMA).view(3, 1, 1)).sum(0, keepdim=True)
        return ((t - self.mean) / self.std).contiguous(), float(zoom)
