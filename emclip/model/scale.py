"""Scale embedding: the physical pixel size of an image, as a vector added to its image feature.

The input is s = log(nm/px). It is first squashed affinely to u in [-1, 1] over the cohort's range (2-100 nm/px by
default; values outside still work, they just land outside [-1, 1]), then encoded by one of:

* ``sincos``: fixed sin/cos features at geometrically spaced frequencies, the 1-D analogue of the resolution-aware
  positional encoding of Scale-MAE (there the ground sample distance rescales the positions fed to sin-cos);
* ``fourier``: learned Fourier features, [cos(2π B u), sin(2π B u)] with B ~ N(0, σ²) trainable;
* ``binned``: a learnable table indexed by log-uniform bins of nm/px (no smoothness prior, a fair comparison).

The encoding goes through a linear layer initialised at zero (the table is zero too), so a freshly built
scale-aware model computes exactly what the scale-blind baseline computes; the difference can only be learnt.
"""
import math
from typing import Sequence

import torch
from torch import nn

SCALE_ENCODINGS = ('sincos', 'fourier', 'binned')


class LogScaleNorm(nn.Module):
    """Map nm/px to u = (log(nm/px) - centre) / half_width, so the cohort's range lands on [-1, 1]."""

    def __init__(self, range_nm: Sequence[float] = (2.0, 100.0)):
        super().__init__()
        lo, hi = (math.log(float(v)) for v in range_nm)
        if not hi > lo:
            raise ValueError(f'range_nm must be increasing positive values, got {range_nm}')
        self.centre, self.half_width = (hi + lo) / 2, (hi - lo) / 2

    def forward(self, nm_per_px: torch.Tensor) -> torch.Tensor:
        # the clamp only guards log(0) from a careless padding value; real scales are validated by the data side
        return (nm_per_px.clamp_min(1e-6).log() - self.centre) / self.half_width


class SinCosEncoding(nn.Module):
    """Fixed [sin(ω_i u), cos(ω_i u)] with ω geometric from 1 to ``max_freq`` rad per unit of u."""

    def __init__(self, dim: int = 64, max_freq: float = 100.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f'sincos encoding needs an even dim, got {dim}')
        # ω=1 is a near-monotone feature over [-1, 1]; ω=100 has a period of a ~13% change of nm/px (default range)
        freqs = torch.logspace(0, math.log10(max_freq), dim // 2)
        self.register_buffer('freqs', freqs, persistent=False)
        self.out_dim = dim

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        angles = u.unsqueeze(-1) * self.freqs.to(u.dtype)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FourierEncoding(nn.Module):
    """Learned Fourier features [cos(2π b_i u), sin(2π b_i u)], b_i ~ N(0, σ²) and trainable."""

    def __init__(self, dim: int = 64, sigma: float = 4.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f'fourier encoding needs an even dim, got {dim}')
        self.freqs = nn.Parameter(torch.randn(dim // 2) * sigma)
        self.out_dim = dim

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * u.unsqueeze(-1) * self.freqs.to(u.dtype)
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ScaleEmbed(nn.Module):
    """nm/px [...] -> additive embedding [..., feature_dim], exactly zero at initialisation."""

    def __init__(
            self,
            feature_dim: int,
            encoding: str = 'sincos',
            range_nm: Sequence[float] = (2.0, 100.0),
            dim: int = 64,
            max_freq: float = 100.0,
            sigma: float = 4.0,
            bins: int = 16,
    ):
        super().__init__()
        if encoding not in SCALE_ENCODINGS:
            raise ValueError(f'Unknown scale encoding {encoding!r}; choose one of {SCALE_ENCODINGS}')
        self.encoding_name = encoding
        self.norm = LogScaleNorm(range_nm)
        if encoding == 'binned':
            # bins are uniform in u over [-1, 1]; out-of-range scales fall into the end bins
            self.register_buffer('edges', torch.linspace(-1, 1, bins + 1)[1:-1], persistent=False)
            self.table = nn.Embedding(bins, feature_dim)
            nn.init.zeros_(self.table.weight)
            self.encoding, self.proj = None, None
        else:
            self.encoding = SinCosEncoding(dim, max_freq) if encoding == 'sincos' else FourierEncoding(dim, sigma)
            self.proj = nn.Linear(self.encoding.out_dim, feature_dim)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, nm_per_px: torch.Tensor) -> torch.Tensor:
        u = self.norm(nm_per_px)
        if self.encoding is None:
            return self.table(torch.bucketize(u.contiguous(), self.edges.to(u.dtype)))
        return self.proj(self.encoding(u).to(self.proj.weight.dtype))


def create_scale_embed(feature_dim: int, cfg: dict, encoding: str = None) -> ScaleEmbed:
    """Build from a config section: ``{"encoding": ..., "range_nm": [...], "<encoding>": {its kwargs}}``."""
    encoding = encoding or cfg.get('encoding', 'sincos')
    return ScaleEmbed(feature_dim, encoding=encoding, range_nm=cfg.get('range_nm', (2.0, 100.0)),
                      **cfg.get(encoding, {}))
