"""Procedural rendering of one renal EM field of view from a patient's scene parameters.

The scene is defined in nanometres and rendered at a given nm/pixel, so that fine structures (fibrils, slit
diaphragms, tubuloreticular inclusions) resolve only at high magnification and whole capillary loops only at low
magnification. Electron-dense material is dark, as on an EM print. Structures narrower than a pixel are drawn with
reduced contrast instead of being dropped, which approximates the averaging of a real detector pixel.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

# Grey levels of the tissue compartments (0 = black, 1 = white).
LUMEN, URINARY, CYTOPLASM, GBM, DENSE, MESANGIUM, RBC = 0.86, 0.80, 0.56, 0.34, 0.14, 0.50, 0.28


class Field:
    """Pixel grid of one image with physical coordinates (nm) and a few drawing helpers."""

    def __init__(self, size: int, nm_per_px: float, centre: tuple[float, float], rng: np.random.Generator):
        self.size, self.s, self.rng = size, nm_per_px, rng
        axis = ((np.arange(size) - size / 2 + 0.5) * nm_per_px).astype(np.float32)
        self.x = axis[None, :] + np.float32(centre[0])
        self.y = axis[:, None] + np.float32(centre[1])
        self.centre = centre
        self.half_fov = size * nm_per_px / 2
        self.img = np.empty((size, size), np.float32)

    def visible(self, cx: float, cy: float, radius: float) -> bool:
        return (abs(cx - self.centre[0]) < self.half_fov + radius) and (abs(cy - self.centre[1]) < self.half_fov + radius)

    def noise(self, corr_nm: float) -> np.ndarray:
        """Smooth unit-variance texture with physical correlation length; fades when finer than a pixel."""
        sigma = corr_nm / self.s
        white = self.rng.standard_normal((self.size, self.size)).astype(np.float32)
        if sigma < 0.3:
            return white * np.float32(sigma / 0.3) * 0.3
        fy = np.fft.fftfreq(self.size)[:, None]
        fx = np.fft.rfftfreq(self.size)[None, :]
        gain = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2))
        field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=white.shape)
        norm = 2 * np.sqrt(np.pi) * min(sigma, self.size / 2)  # theoretical std of filtered white noise
        return (field * norm * min(1.0, sigma / 0.7)).astype(np.float32)

    def box(self, cx: float, cy: float, radius: float):
        """Slices of the pixel window around a physical point, or None when outside the image."""
        px, py = (cx - self.x[0, 0]) / self.s, (cy - self.y[0, 0]) / self.s
        rad = radius / self.s + 2
        x0, x1 = max(int(px - rad), 0), min(int(px + rad) + 2, self.size)
        y0, y1 = max(int(py - rad), 0), min(int(py + rad) + 2, self.size)
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def ellipse(self, cx, cy, a, b, angle, value, soft=1.0, mask=None):
        """Fill an ellipse (semi-axes a, b nm) with a grey level, edge softened over ``soft`` pixels."""
        win = self.box(cx, cy, max(a, b))
        if win is None:
            return
        dx, dy = self.x[:, win[1]] - cx, self.y[win[0], :] - cy
        c, s = np.cos(angle), np.sin(angle)
        u, v = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
        rho = np.sqrt(u ** 2 + v ** 2)
        edge_px = (rho - 1) * min(a, b) / self.s
        alpha = np.clip(0.5 - edge_px / (2 * soft), 0, 1) * min(1.0, 2 * min(a, b) / self.s)
        if mask is not None:
            alpha = alpha * mask[win]
        self.img[win] += alpha * (value - self.img[win])

    def line(self, x0, y0, x1, y1, width, darkness):
        """Darken along a segment of physical width ``width``; sub-pixel widths keep proportional contrast."""
        half = width / 2
        win = self.box((x0 + x1) / 2, (y0 + y1) / 2, np.hypot(x1 - x0, y1 - y0) / 2 + half)
        if win is None:
            return
        px, py = self.x[:, win[1]] - x0, self.y[win[0], :] - y0
        dx, dy = x1 - x0, y1 - y0
        t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
        dist = np.hypot(px - t * dx, py - t * dy) / self.s
        half_px = half / self.s
        profile = np.exp(-(dist / max(half_px, 0.5)) ** 2) * min(1.0, 2 * half_px)
        self.img[win] -= darkness * profile * self.img[win]


def _periodic_noise(n: int, corr: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth periodic 1-D noise with unit std (``corr`` in samples), sampled later by angle along a loop."""
    f = np.fft.rfftfreq(n)
    spec = np.fft.rfft(rng.standard_normal(n)) * np.exp(-2 * np.pi ** 2 * corr ** 2 * f ** 2)
    out = np.fft.irfft(spec, n)
    return out / (out.std() + 1e-9)


def _place_centre(p: dict, nm_per_px: float, size: int, rng: np.random.Generator) -> tuple[str, float]:
    """High-magnification fields are centred on a lesion-bearing compartment, as a pathologist would frame them."""
    on_mesangium = rng.random() < float(p["mesangial_target"])
    return ("mesangium" if on_mesangium else "gbm"), float(rng.uniform(0, 2 * np.pi))


def render_field(p: dict, nm_per_px: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one grayscale field (float32 in [0, 1]) of a scene described by sampled parameters ``p``."""
    target, phi = _place_centre(p, nm_per_px, size, rng)
    radius = p["loop_radius_nm"] * rng.uniform(0.85, 1.15)
    thick = p["gbm_thickness_nm"]
    fov = size * nm_per_px
    # World: the primary loop's GBM (or the mesangium) passes near the image centre.
    jitter = min(fov / 2, 2000.0) * 0.3
    loop_centre = (-(radius + thick / 2) * np.cos(phi) + rng.uniform(-jitter, jitter),
                   -(radius + thick / 2) * np.sin(phi) + rng.uniform(-jitter, jitter))
    mes_r = p["mesangium_radius_nm"]
    if target == "mesangium":
        mes_centre = (rng.uniform(-0.2, 0.2) * mes_r, rng.uniform(-0.2, 0.2) * mes_r)
        loop_centre = (mes_centre[0] - (radius + mes_r * 0.8) * np.cos(phi),
                       mes_centre[1] - (radius + mes_r * 0.8) * np.sin(phi))
    else:
        d = radius + thick + mes_r * 0.8
        a = phi + rng.uniform(0.6, 1.4) * rng.choice([-1, 1])
        mes_centre = (loop_centre[0] + d * np.cos(a), loop_centre[1] + d * np.sin(a))

    f = Field(size, nm_per_px, (0.0, 0.0), rng)
    f.img[:] = URINARY + 0.03 * f.noise(1500.0)
    _podocyte_bodies(f, p, loop_centre, radius)
    _mesangium(f, p, mes_centre, mes_r)
    loops = [(loop_centre, radius)] + _extra_loops(f, loop_centre, radius, mes_centre, mes_r, p)
    for centre, r in loops:
        if f.visible(centre[0], centre[1], r + thick + 2000):
            _capillary_loop(f, p, centre, r)
    _fibrils(f, p, mes_centre, mes_r, loops)
    return _camera(f)


def _extra_loops(f: Field, c0, r0, mes_c, mes_r, p) -> list:
    """Neighbouring capillary loops, visible at low magnification; rejection-sampled to avoid overlaps."""
    out, placed = [], [(c0, r0 + p["gbm_thickness_nm"] + 300), (mes_c, mes_r)]
    area = (2 * f.half_fov + 2 * r0) ** 2
    n_try = min(int(area / (np.pi * (2.2 * r0) ** 2)) + 2, 24)
    for _ in range(n_try):
        r = p["loop_radius_nm"] * f.rng.uniform(0.7, 1.2)
        c = (f.rng.uniform(-1, 1) * (f.half_fov + r), f.rng.uniform(-1, 1) * (f.half_fov + r))
        if all(np.hypot(c[0] - q[0][0], c[1] - q[0][1]) > q[1] + r + 900 for q in placed):
            placed.append((c, r + p["gbm_thickness_nm"] + 300))
            out.append((c, r))
        if len(out) >= 8:
            break
    return out


def _podocyte_bodies(f: Field, p, loop_centre, radius):
    for _ in range(f.rng.integers(1, 4)):
        ang = f.rng.uniform(0, 2 * np.pi)
        dist = radius + p["gbm_thickness_nm"] + f.rng.uniform(1500, 4000)
        cx, cy = loop_centre[0] + dist * np.cos(ang), loop_centre[1] + dist * np.sin(ang)
        a, b = f.rng.uniform(2000, 3500), f.rng.uniform(1200, 2200)
        f.ellipse(cx, cy, a, b, ang, CYTOPLASM + 0.02, soft=2)
        f.ellipse(cx, cy, a * 0.45, b * 0.5, ang, 0.44, soft=2)


def _mesangium(f: Field, p, centre, r):
    if not f.visible(centre[0], centre[1], r * 1.5):
        return
    ang = f.rng.uniform(0, np.pi)
    f.ellipse(centre[0], centre[1], r, r * f.rng.uniform(0.6, 0.9), ang, MESANGIUM, soft=3)
    f.img += (0.03 * f.noise(60.0)) * (np.abs(f.img - MESANGIUM) < 0.02)
    f.ellipse(centre[0] + 0.3 * r, centre[1], r * 0.3, r * 0.22, ang, 0.40, soft=2)  # mesangial cell nucleus
    if p.get("mesangial_nodules"):
        for _ in range(f.rng.integers(2, 4)):
            a = f.rng.uniform(0, 2 * np.pi)
            nr = r * f.rng.uniform(0.25, 0.4)
            f.ellipse(centre[0] + 0.5 * r * np.cos(a), centre[1] + 0.5 * r * np.sin(a), nr, nr, 0, 0.62, soft=3)
    for dep in p["deposits"]:
        if dep["site"] != "mesangial":
            continue
        n = f.rng.poisson(dep["per_um2"] * np.pi * (r / 1000) ** 2 * 0.7)
        for _ in range(n):
            rr, a = r * 0.85 * np.sqrt(f.rng.random()), f.rng.uniform(0, 2 * np.pi)
            sz = dep["size_nm"] * f.rng.uniform(0.6, 1.3)
            f.ellipse(centre[0] + rr * np.cos(a), centre[1] + rr * np.sin(a), sz / 2, sz / 3,
                      f.rng.uniform(0, np.pi), DENSE)


def _capillary_loop(f: Field, p: dict, centre, radius):
    """Lumen, endothelium, GBM (with Alport lamellation), foot processes, slits and loop-bound deposits."""
    rng = f.rng
    reach = radius * 1.1 + p["gbm_thickness_nm"] * (1 + p["gbm_irregularity"]) * 2.5 + p["foot_process_height_nm"] * 2
    win = f.box(centre[0], centre[1], reach)
    if win is None:
        return
    dx, dy = f.x[:, win[1]] - np.float32(centre[0]), f.y[win[0], :] - np.float32(centre[1])
    img = f.img[win]                               # a view: writes go to the image
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    n_arc = 4096
    idx = ((theta + np.pi) / (2 * np.pi) * n_arc).astype(np.int32) % n_arc
    per_sample = 2 * np.pi * radius / n_arc       # nm of arc per angular sample
    wobble = 1 + 0.03 * _periodic_noise(n_arc, 600, rng)
    irregular = np.clip(1 + p["gbm_irregularity"] * _periodic_noise(n_arc, 900 / per_sample, rng), 0.3, 2.5)
    thick = (p["gbm_thickness_nm"] * irregular[idx]).astype(np.float32)
    endo = p["endothelium_nm"]
    depth = r - radius * wobble[idx].astype(np.float32)   # nm outward from the inner GBM surface
    img[depth < -endo] = LUMEN
    if rng.random() < 0.4:                         # a red cell inside the lumen
        a = rng.uniform(0, 2 * np.pi)
        f.ellipse(centre[0] + 0.35 * radius * np.cos(a), centre[1] + 0.35 * radius * np.sin(a),
                  radius * 0.45, radius * 0.3, a, RBC, soft=2)
    # fenestrated endothelium
    endo_band = (depth >= -endo) & (depth < 0)
    fen = np.mod(idx * per_sample, 110.0) < 55.0
    img[endo_band] = np.where(fen[endo_band], 0.72, CYTOPLASM - 0.04)
    # GBM: darker lamina densa in the middle, lighter laminae rarae at the surfaces
    gbm = (depth >= 0) & (depth < thick)
    u = depth[gbm] / np.maximum(thick[gbm], 1)
    img[gbm] = GBM + 0.10 * (1 - np.sin(np.pi * u)) + 0.025 * rng.standard_normal(u.shape).astype(np.float32)
    if p["lamellation"]:                           # Alport "basket-weave": split, interlacing lamina densa
        phase = (_periodic_noise(n_arc, 40, rng) * 0.8)[idx[gbm]]
        layers = np.sin(2 * np.pi * (u * thick[gbm] / 70.0 + phase))
        img[gbm] += (0.22 * (layers > 0.55) * min(1.0, 35.0 / f.s)).astype(np.float32)
    # podocyte foot processes (or a continuous effaced sheet) on the outer GBM surface
    outer = depth - thick
    near = (outer >= 0) & (outer < p["foot_process_height_nm"] * 1.2)
    height = p["foot_process_height_nm"]
    eff_arc = _periodic_noise(n_arc, 2500 / per_sample, rng)
    effaced_arc = eff_arc < np.quantile(eff_arc, p["effacement"]) if p["effacement"] > 0 else np.zeros(n_arc, bool)
    width = p["foot_process_width_nm"]
    jitter = 0.25 * width * _periodic_noise(n_arc, 8, rng)
    i_near, o_near = idx[near], outer[near]
    effaced = effaced_arc[i_near]
    frac = np.mod(i_near * per_sample + jitter[i_near], width) / width
    slit = frac > 1 - p["slit_width_nm"] / width
    dome = height * (0.45 + 0.55 * np.sqrt(np.clip(1 - (2 * frac - 1) ** 2, 0, 1)))
    values = img[near]
    values[~effaced & ~slit & (o_near < dome)] = CYTOPLASM - 0.06
    sheet = effaced & (o_near < height * 1.15)
    values[sheet] = CYTOPLASM - 0.02
    values[sheet & (o_near < 70)] = CYTOPLASM - 0.12      # condensed actin mat of effaced processes
    diaphragm = ~effaced & slit & (np.abs(o_near - 25) < max(f.s, 6.0))  # ~6 nm line bridging each slit
    values[diaphragm] -= np.float32(0.25 * min(1.0, 6.0 / f.s))
    img[near] = values
    _loop_deposits(f, p, centre, radius, wobble, float(p["gbm_thickness_nm"]))
    if p["tubuloreticular"]:
        _tubuloreticular(f, centre, radius, endo)


def _loop_deposits(f: Field, p, centre, radius, wobble, mean_thick):
    for dep in p["deposits"]:
        if dep["site"] not in ("subepithelial", "subendothelial"):
            continue
        n = f.rng.poisson(dep["per_um"] * 2 * np.pi * radius / 1000)
        angles = np.sort(f.rng.uniform(0, 2 * np.pi, n))
        sizes = dep["size_nm"] * f.rng.uniform(0.6, 1.3, n)
        for a, sz in zip(angles, sizes):
            r_in = radius * wobble[int((a % (2 * np.pi)) / (2 * np.pi) * len(wobble)) % len(wobble)]
            rr = r_in + mean_thick + sz * 0.35 if dep["site"] == "subepithelial" else r_in - sz * 0.1
            cx, cy = centre[0] + rr * np.cos(a), centre[1] + rr * np.sin(a)
            if f.visible(cx, cy, sz):
                f.ellipse(cx, cy, sz * 0.35, sz / 2, a, DENSE)
        if dep.get("spikes") and n > 1:   # GBM material growing between neighbouring subepithelial deposits
            for a0, a1, sz in zip(angles[:-1], angles[1:], sizes):
                a = (a0 + a1) / 2
                r0 = radius + mean_thick
                x0, y0 = centre[0] + r0 * np.cos(a), centre[1] + r0 * np.sin(a)
                x1, y1 = centre[0] + (r0 + sz * 0.7) * np.cos(a), centre[1] + (r0 + sz * 0.7) * np.sin(a)
                if f.visible(x0, y0, sz):
                    f.line(x0, y0, x1, y1, 60.0, 0.35)


def _tubuloreticular(f: Field, centre, radius, endo):
    """Endothelial cell bulges holding clusters of ~24 nm anastomosing tubules."""
    for _ in range(f.rng.integers(1, 3)):
        a = f.rng.uniform(0, 2 * np.pi)
        rr = radius - endo - 250
        cx, cy = centre[0] + rr * np.cos(a), centre[1] + rr * np.sin(a)
        if not f.visible(cx, cy, 900):
            continue
        f.ellipse(cx, cy, 300, 900, a, CYTOPLASM, soft=2)
        for _ in range(int(f.rng.integers(20, 40))):
            tr, ta = 180 * np.sqrt(f.rng.random()), f.rng.uniform(0, 2 * np.pi)
            tx, ty = cx + tr * np.cos(ta), cy + tr * np.sin(ta)
            f.line(tx - 24, ty, tx + 24, ty, 24.0, 0.45)   # each tubule seen as a ~24 nm dense profile


def _fibrils(f: Field, p, mes_centre, mes_r, loops):
    """Randomly oriented, non-branching fibrils in the mesangium and GBM (amyloid-type deposits)."""
    fib = p["fibrils"]
    if not fib:
        return
    region = (np.hypot(f.x - mes_centre[0], f.y - mes_centre[1]) < mes_r * 0.9)
    if fib.get("in_gbm"):
        region = region | (np.abs(f.img - GBM - 0.05) < 0.06)
    region_f = region.astype(np.float32)
    f.img += region_f * (0.62 - f.img) * 0.5      # pale, "fluffy" infiltrate seen at any magnification
    d, length = fib["diameter_nm"], fib["length_nm"]
    if d / f.s < 0.35:                            # fibrils far below a pixel: only the tint shows
        f.img -= region_f * 0.04
        return
    area = region.sum() * f.s ** 2
    n = min(int(fib["coverage"] * area / (length * d)), 1500)
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return
    pick = f.rng.integers(0, len(xs), n)
    for i in pick:
        cx, cy = float(f.x[0, xs[i]]), float(f.y[ys[i], 0])
        ang, ln = f.rng.uniform(0, np.pi), length * f.rng.uniform(0.5, 1.5)
        ddx, ddy = np.cos(ang) * ln / 2, np.sin(ang) * ln / 2
        f.line(cx - ddx, cy - ddy, cx + ddx, cy + ddy, d * f.rng.uniform(0.9, 1.1), 0.35)


def _camera(f: Field) -> np.ndarray:
    """Detector blur, uneven illumination and shot noise, as in a digital EM camera."""
    img = gaussian_filter(f.img, 0.6, mode="nearest")
    yy, xx = np.mgrid[0:f.size, 0:f.size].astype(np.float32) / f.size - 0.5
    gx, gy = f.rng.normal(0, 0.05, 2)
    img = img + gx * xx + gy * yy
    img = img + f.rng.uniform(0.03, 0.05) * f.rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0, 1)
