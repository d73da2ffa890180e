"""Scale embedding and scale conditioning: how the physical pixel size of an image changes how it is read.

``ScaleEmbed`` turns nm/px into a vector; ``ScaleConditioning`` decides where that vector enters the image side
(added, FiLM, a residual MLP, inside a ViT trunk, the attention scorer) and builds the matching scale-blind arm.

The input is s = log(nm/px). It is first squashed affinely to u in [-1, 1] over the cohort's range (2-100 nm/px by
default; values outside still work, they just land outside [-1, 1]), then encoded by one of:

* ``sincos``: fixed sin/cos features at geometrically spaced frequencies, the 1-D analogue of the resolution-aware
  positional encoding of Scale-MAE (there the ground sample distance rescales the positions fed to sin-cos);
* ``fourier``: learned Fourier features, [cos(2π B u), sin(2π B u)] with B ~ N(0, σ²) trainable;
* ``binned``: a learnable table indexed by log-uniform bins of nm/px (no smoothness prior, a fair comparison).

The encoding goes through a linear layer initialised at zero (the table is zero too), so a freshly built
scale-aware model computes exactly what the scale-blind baseline computes; the difference can only be learnt.
"""
import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SCALE_ENCODINGS = ('sincos', 'fourier', 'binned')
DEFAULT_SCALE_ENCODING = 'sincos'


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
            return self.table(self._bins(u))
        return self.proj(self.encoding(u).to(self.proj.weight.dtype))

    def add_to(self, h: torch.Tensor, nm_per_px: torch.Tensor) -> torch.Tensor:
        """h + e(s) for h [N, F], nm/px [N], in one fused product: addmm(h, [enc, 1], [P, c]ᵀ) writes the sum once
        (no F-wide e(s) temporary, no separate bias pass); the bias gradient is part of the weight's product."""
        if self.encoding is None or h.dim() != 2:
            return h + self(nm_per_px).to(h.dtype)
        enc = self.encoding(self.norm(nm_per_px)).to(h.dtype)
        enc = torch.cat([enc, enc.new_ones(len(enc), 1)], dim=1)
        return torch.addmm(h, enc, torch.cat([self.proj.weight, self.proj.bias[:, None]], dim=1).to(h.dtype).T)

    def pooled(self, nm_per_px: torch.Tensor, pool: Callable) -> torch.Tensor:
        """pool(e(s)) for an affine ``pool`` whose weights sum to one: P pool(enc) + c, the encoding pooled first."""
        if self.encoding is None:
            return pool(self(nm_per_px))
        return self.proj(pool(self.encoding(self.norm(nm_per_px)).to(self.proj.weight.dtype)))

    def through(self, nm_per_px: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """e(s) @ weight.T [..., out] without forming the feature_dim-wide e(s): the linear maps are multiplied
        first, (P enc + c) Wᵀ = enc (W P)ᵀ + W c (a table: its rows times Wᵀ), so neither e(s) nor its gradient is
        ever [..., feature_dim]."""
        u = self.norm(nm_per_px)
        if self.encoding is None:
            return F.embedding(self._bins(u), self.table.weight @ weight.T)
        return F.linear(self.encoding(u).to(weight.dtype), weight @ self.proj.weight, weight @ self.proj.bias)

    def _bins(self, u: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(u.contiguous(), self.edges.to(u.dtype))


def create_scale_embed(feature_dim: int, cfg: dict, encoding: str = None) -> ScaleEmbed:
    """Build from a config section: ``{"encoding": ..., "range_nm": [...], "<encoding>": {its kwargs}}``; the
    embedding has ``feature_dim`` outputs."""
    encoding = encoding or cfg.get('encoding', DEFAULT_SCALE_ENCODING)
    return ScaleEmbed(feature_dim, encoding=encoding, range_nm=cfg.get('range_nm', (2.0, 100.0)),
                      **cfg.get(encoding, {}))


SCALE_MODES = ('add', 'film', 'mlp', 'trunk')
# From this many packed instances on, the mlp mode's LayerNorm + first linear run fused (``_NormLinear``): its backward
# costs a fixed F x H x (d + 1) product (~85 MFLOP at 1280 x 512 x 65) and saves the N x H x F input gradient
# (~1.3 MFLOP per instance), so it pays off above ~65 instances; a small bag alone runs the plain layers.
FUSE_MIN_INSTANCES = 64
# mlp (with mean pooling) was chosen on validation by the scale study (docs/study.md)
DEFAULT_SCALE_MODE = 'mlp'


class ScaleConditioning(nn.Module):
    """Where and how the physical scale enters the image side; the scale-blind arm is the same module, scale-free.

    Modes (``h`` is the trunk feature [..., F], ``e(s)`` a zero-initialised ``ScaleEmbed``):

    * ``add``:   h + e(s). Followed by a linear projection and mean pooling this cannot change how an image is read
      (the patient vector is W·mean(h) + W·mean(e(s))); kept as the first release's mode, for comparison.
    * ``film``:  (1 + g + γ(s)) ⊙ h + b + β(s), feature-wise linear modulation. ``g``, ``b`` are learnt constants
      (the blind arm keeps them), γ, β come from the scale and start at zero: identity at initialisation.
    * ``mlp``:   x = h + e(s), then x + MLP(x) per image, the MLP's last layer zero-initialised. Blind: h + MLP(h).
    * ``trunk``: e(s) added to every token of a ViT trunk after its positional embedding (Scale-MAE's place for its
      resolution-aware encoding), end-to-end mode only; the feature itself passes unchanged.

    ``attention=True`` also feeds e(s) into the gated-attention scorer (its hidden pre-activations), so the weight of
    an image can depend on its magnification. Every scale-dependent layer lives in ``embeds`` (zero at
    initialisation), every other layer in ``layers``: the blind arm has exactly ``layers``, so an ablation compares
    the scale input, not capacity, and a fresh aware model computes what the blind one computes.
    """

    def __init__(self, feature_dim: int, cfg: Optional[dict] = None, aware: bool = True, attention_dim: int = 0):
        super().__init__()
        cfg = dict(cfg or {})
        self.mode = cfg.get('mode', DEFAULT_SCALE_MODE)
        if self.mode not in SCALE_MODES:
            raise ValueError(f'Unknown scale mode {self.mode!r}; choose one of {SCALE_MODES}')
        self.aware, self.feature_dim = bool(aware), feature_dim
        self.attention = bool(cfg.get('attention', False))
        self.layers = nn.ModuleDict()
        if self.mode == 'film':
            self.layers['gain'] = _ZeroVector(feature_dim)
            self.layers['bias'] = _ZeroVector(feature_dim)
        elif self.mode == 'mlp':
            hidden = int(cfg.get('mlp', {}).get('hidden_dim', 512))
            last = nn.Linear(hidden, feature_dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.layers['mlp'] = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(),
                                               last)
        # scale embeddings on a forked RNG: building them leaves every shared layer's initialisation unchanged
        self.embeds = nn.ModuleDict()
        self._trunk_scales = None
        with torch.random.fork_rng(devices=[]):
            if self.aware and self.mode in ('add', 'mlp'):
                self.embeds['feature'] = create_scale_embed(feature_dim, cfg)
            elif self.aware and self.mode == 'film':
                self.embeds['feature'] = create_scale_embed(2 * feature_dim, cfg)
            if self.aware and self.attention:
                if attention_dim < 1:
                    raise ValueError('scale.attention needs the gated_attention aggregator (it conditions its scorer)')
                self.embeds['attention'] = create_scale_embed(2 * attention_dim, cfg)

    @property
    def embedding(self) -> Optional[nn.Module]:
        """The scale-input part (None for the blind arm): what ``parameter_counts`` calls ``scale_embed``."""
        return self.embeds if len(self.embeds) else None

    def forward(self, h: torch.Tensor, nm_per_px: torch.Tensor) -> torch.Tensor:
        """Condition trunk features h [B, K, F] on their images' nm/px [B, K]."""
        feature = self.embeds['feature'] if 'feature' in self.embeds else None
        if self.mode == 'add':
            return h + feature(nm_per_px).to(h.dtype) if feature is not None else h
        if self.mode == 'film':
            gain, bias = self.layers['gain'](), self.layers['bias']()
            if feature is not None:
                gamma, beta = feature(nm_per_px).to(h.dtype).chunk(2, dim=-1)
                gain, bias = gain + gamma, bias + beta
            return (1 + gain) * h + bias
        if self.mode == 'mlp':
            x = self._mlp_input(h, nm_per_px)
            return x + self.layers['mlp'](x)
        return h  # trunk mode: the scale already entered inside the trunk

    def pooled(self, h: torch.Tensor, nm_per_px: torch.Tensor, pool: Callable) -> torch.Tensor:
        """``pool(self(h, nm_per_px))`` for an affine ``pool`` whose weights sum to one (a mean per bag), cheaper.

        In the mlp mode the MLP's last layer L is affine too, so pool(x + L(g(x))) = pool(x) + L(pool(g(x))): L runs
        on the pooled rows instead of on every instance, and its gradient is no instance-wide product either.
        """
        if self.mode != 'mlp':
            return pool(self(h, nm_per_px))
        mlp = self.layers['mlp']
        # pool(x) = pool(h) + pool(e(s)) = pool(h) + P pool(enc) + c: x's gradient then comes from the MLP alone
        feature = self.embeds['feature'] if 'feature' in self.embeds else None
        pooled_x = pool(h) if feature is None else pool(h) + feature.pooled(nm_per_px, pool).to(h.dtype)
        return pooled_x + mlp[-1](pool(self._mlp_hidden(h, nm_per_px)))

    def _mlp_hidden(self, h: torch.Tensor, nm_per_px: torch.Tensor) -> torch.Tensor:
        """GELU(W1 LN(h + e(s)) + b1) [N, hidden] of packed h [N, F]; fused (``_NormLinear``) when the gradient
        needs no F-wide product: h constant (cached features), e(s) a fixed encoding."""
        feature = self.embeds['feature'] if 'feature' in self.embeds else None
        norm, first = self.layers['mlp'][0], self.layers['mlp'][1]
        fusable = (h.dim() == 2 and len(h) >= FUSE_MIN_INSTANCES and not h.requires_grad
                   and norm.elementwise_affine and norm.bias is not None
                   and (feature is None or feature.encoding_name == 'sincos'))
        if not fusable:
            return self.layers['mlp'][2](first(norm(self._mlp_input(h, nm_per_px))))
        if feature is None:
            enc, embed = h.new_zeros(len(h), 0), h.new_zeros(h.shape[1], 0)
        else:
            enc = feature.encoding(feature.norm(nm_per_px)).to(h.dtype)
            enc = torch.cat([enc, enc.new_ones(len(enc), 1)], dim=1)
            embed = torch.cat([feature.proj.weight, feature.proj.bias[:, None]], dim=1).to(h.dtype)
        pre = _NormLinear.apply(h, enc, embed, norm.weight, norm.bias, first.weight, first.bias, norm.eps)
        return self.layers['mlp'][2](pre)

    def _mlp_input(self, h: torch.Tensor, nm_per_px: torch.Tensor) -> torch.Tensor:
        """x = h + e(s), what the mlp mode's MLP reads (h in the blind arm)."""
        feature = self.embeds['feature'] if 'feature' in self.embeds else None
        return feature.add_to(h, nm_per_px) if feature is not None else h

    def attention_context(self, nm_per_px: torch.Tensor) -> Optional[torch.Tensor]:
        """Additive terms [B, K, 2H] for the gated-attention scorer's two hidden pre-activations, or None."""
        if 'attention' not in self.embeds:
            return None
        return self.embeds['attention'](nm_per_px)

    # --- scale inside a ViT trunk (end-to-end mode) ---
    def attach_trunk(self, trunk: nn.Module, cfg: Optional[dict] = None) -> None:
        """Register the token-level scale embedding on a ViT trunk (open_clip or timm VisionTransformer)."""
        if self.mode != 'trunk':
            return
        hook_at, width = _vit_token_site(trunk)
        if self.aware:
            with torch.random.fork_rng(devices=[]):
                self.embeds['tokens'] = create_scale_embed(width, cfg or {})
            hook_at.register_forward_hook(self._add_to_tokens)

    def _add_to_tokens(self, module, inputs, tokens):
        if self._trunk_scales is None:
            raise RuntimeError('a scale-in-trunk model needs the images\' nm/px: call encode_trunk(images, scales)')
        if tokens.dim() != 3 or tokens.shape[0] != self._trunk_scales.shape[0]:
            raise RuntimeError(f'unexpected ViT token shape {tuple(tokens.shape)} for {len(self._trunk_scales)} images')
        return tokens + self.embeds['tokens'](self._trunk_scales)[:, None, :].to(tokens.dtype)

    @contextlib.contextmanager
    def trunk_scales(self, nm_per_px: Optional[torch.Tensor]):
        """Within this context the trunk's token hook reads these per-image scales [N]."""
        self._trunk_scales = nm_per_px
        try:
            yield
        finally:
            self._trunk_scales = None


class _NormLinear(torch.autograd.Function):
    """u = W1 LN(x) + b1 with x = h + E [enc, 1]ᵀ (h constant, enc fixed), whose backward skips the F-wide products.

    LN(x) = x̂ ⊙ γ + β, so u = x̂ (W1 diag γ)ᵀ + (W1 β + b1) and, with g = ∂L/∂u and M = gᵀ x̂ [H, F], one product
    gives the layer's gradients: ∂W1 = M diag γ + (gᵀ1) βᵀ, ∂γ = colsum(W1 ⊙ M), ∂β = W1ᵀ gᵀ1, ∂b1 = gᵀ1. The
    embedding's ∂E = Σ_n ∂x_n [enc_n, 1]ᵀ needs ∂x_n = r_n (ĝ_n - a_n - b_n x̂_n) (LN's backward, ĝ_n = γ ⊙ W1ᵀ g_n,
    r_n = 1/σ_n) only through products with the narrow [enc, 1]: a_n = g_n·W1γ / F, b_n = g_n·(u_n - W1β - b1) / F
    (the forward's own x̂ (W1 diag γ)ᵀ), so the N x H x F product W1ᵀ g and the [N, F] ∂x are never formed.
    """

    @staticmethod
    def forward(ctx, h, enc, embed, gamma, beta, w1, b1, eps):
        x = torch.addmm(h, enc, embed.T) if enc.shape[1] else h
        xhat, _, rstd = torch.native_layer_norm(x, [x.shape[1]], None, None, eps)
        shift = torch.addmv(b1, w1, beta)
        u = torch.addmm(shift, xhat, (w1 * gamma).T)
        ctx.save_for_backward(enc, embed, gamma, beta, w1, xhat, rstd.squeeze(1), u, shift)
        return u

    @staticmethod
    def backward(ctx, g):
        enc, embed, gamma, beta, w1, xhat, rstd, u, shift = ctx.saved_tensors
        g_sum = g.sum(0)
        m = g.T @ xhat
        grad_w1 = torch.addr(m * gamma, g_sum, beta)
        grad_gamma, grad_beta = (w1 * m).sum(0), w1.T @ g_sum
        grad_embed = None
        if ctx.needs_input_grad[2] and enc.shape[1]:
            f = xhat.shape[1]
            a = g @ (w1 @ gamma) / f
            b = (g * (u - shift)).sum(1) / f
            renc = rstd[:, None] * enc
            grad_embed = (w1.T @ (g.T @ renc)) * gamma[:, None] - ((rstd * a) @ enc)[None, :] \
                - xhat.T @ (b[:, None] * renc)
        return None, None, grad_embed, grad_gamma, grad_beta, grad_w1, g_sum, None


class _ZeroVector(nn.Module):
    """A learnt vector that starts at zero (FiLM's constant gain and bias, shared by both arms)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self) -> torch.Tensor:
        return self.weight


def _vit_token_site(trunk: nn.Module):
    """(module whose output is the token sequence after the positional embedding, token width) of a ViT trunk."""
    if hasattr(trunk, 'patch_dropout') and hasattr(trunk, 'class_embedding'):      # open_clip VisionTransformer
        return trunk.patch_dropout, int(trunk.class_embedding.shape[-1])
    if hasattr(trunk, 'patch_drop') and hasattr(trunk, 'embed_dim'):              # timm VisionTransformer
        return trunk.patch_drop, int(trunk.embed_dim)
    raise ValueError(f'scale.mode "trunk" needs a ViT image trunk (open_clip or timm VisionTransformer); '
                     f'got {type(trunk).__name__}')
