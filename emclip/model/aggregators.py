"""Multiple-instance aggregators over padded bags.

Every aggregator takes instance features x [B, K, D] and a boolean mask [B, K] (True = real instance) and returns
the pooled bag feature [B, D] and per-instance weights [B, K] (zero on padding, summing to one per bag).

Bags of different sizes share one batch: padding never enters a sum and masked scores are set to -inf before every
softmax, so a padded + masked bag gives exactly the result of the bag alone. ABMIL, CLAM and TransMIL sidestep
this by training with batch size 1; contrastive learning needs many bags per step, hence the masks.

``pool_packed`` gives the same result from the real instances alone, packed as ``x[mask]`` ([N, D], see ``Packed``):
what the model uses, so that no per-instance layer ever runs on padding.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

AGGREGATORS = ('mean', 'gated_attention', 'transformer')
DEFAULT_AGGREGATOR = 'mean'


def check_bags(mask: torch.Tensor):
    """Refuse empty bags: a softmax over nothing but -inf is NaN, and a mean over nothing is 0/0."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f'mask must be a boolean [B, K] tensor, got {mask.dtype} {tuple(mask.shape)}')
    empty = ~mask.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f'Empty bag(s): batch row(s) {rows} have no real image (mask all False)')


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return scores.masked_fill(~mask, float('-inf')).softmax(dim=dim)


class Packed(NamedTuple):
    """Where the real instances of padded bags sit once packed: ``x[mask]`` is [N, D], bag by bag, in mask order."""
    mask: torch.Tensor  # [B, K] the padded layout
    bag: torch.Tensor  # [N] bag (row) index of every packed instance
    slot: torch.Tensor  # [N] its column in the padded layout
    counts: torch.Tensor  # [B] instances per bag

    @classmethod
    def of(cls, mask: torch.Tensor) -> 'Packed':
        check_bags(mask)
        bag, slot = mask.nonzero(as_tuple=True)
        return cls(mask, bag, slot, mask.sum(dim=1))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-bag sums [B, D] of packed rows x [N, D]."""
        return x.new_zeros(len(self.counts), *x.shape[1:]).index_add(0, self.bag, x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-bag means [B, D] of packed rows x [N, D]."""
        return self.sum(x) / self.counts.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Packed rows [N, ...] in the padded layout [B, K, ...], ``fill`` on padding."""
        return x.new_full((*self.mask.shape, *x.shape[1:]), fill).index_put((self.bag, self.slot), x)

    def mean_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights [B, K] of a mean: 1/n_b on real instances, zero on padding."""
        return self.mask.to(dtype) / self.counts.to(dtype)[:, None]


def pool_packed(aggregator: nn.Module, x: torch.Tensor, packed: Packed, context: torch.Tensor = None):
    """(pooled [B, D], weights [B, K]) of ``aggregator`` over packed instances x [N, D] (context [N, 2H] optional):
    what ``aggregator(packed.pad(x), packed.mask[, context])`` returns, with no per-instance layer on padding."""
    if isinstance(aggregator, MeanPool):
        return packed.mean(x), packed.mean_weights(x.dtype)
    if isinstance(aggregator, GatedAttentionPool):
        weights = masked_softmax(packed.pad(aggregator.scores(x, context), float('-inf')), packed.mask)
        return packed.sum(weights[packed.bag, packed.slot][:, None] * x), weights
    # the transformer's attention needs the padded layout (its padding keys are masked, their values never read)
    return aggregator(packed.pad(x), packed.mask)


class MeanPool(nn.Module):
    """Average of the real instances; the weights are uniform, 1/n_b."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        check_bags(mask)
        weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).to(x.dtype)
        return torch.einsum('bk,bkd->bd', weights, x), weights


class GatedAttentionPool(nn.Module):
    """Gated attention MIL pooling (Ilse et al. 2018, as in CLAM): a_k = softmax_k(wᵀ(tanh(V x_k) ⊙ σ(U x_k)))."""

    def __init__(self, dim: int, hidden_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.attn_v = nn.Linear(dim, hidden_dim)
        self.attn_u = nn.Linear(dim, hidden_dim)
        self.attn_w = nn.Linear(hidden_dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor = None):
        """``context`` [B, K, 2·hidden], optional, is added to the two hidden pre-activations (V x, U x): how the
        scale conditions the scorer."""
        check_bags(mask)
        weights = masked_softmax(self.scores(x, context), mask)
        return torch.einsum('bk,bkd->bd', weights, x), weights

    def scores(self, x: torch.Tensor, context: torch.Tensor = None) -> torch.Tensor:
        """Unnormalised attention scores [...] of instances x [..., D], each scored on its own."""
        v, u = self.attn_v(x), self.attn_u(x)
        if context is not None:
            cv, cu = context.to(x.dtype).chunk(2, dim=-1)
            v, u = v + cv, u + cu
        return self.attn_w(self.drop(torch.tanh(v) * torch.sigmoid(u))).squeeze(-1)


class MaskedSelfAttention(nn.MultiheadAttention):
    """torch's multi-head self-attention with the padding keys masked; returns (output, head-averaged attention).

    Runs written when this was a hand-made module (an ``qkv`` and a ``proj`` linear, in torch's row layout: q, k, v
    stacked, heads contiguous) load through :meth:`_load_from_state_dict`, which renames their keys. Two things
    differ from that module: a fresh one starts from torch's initialisation (xavier, zero biases), and with attention
    dropout in training the returned weights are the dropped-out ones (every shipped config has dropout 0)."""

    OLD_KEYS = {'qkv.weight': 'in_proj_weight', 'qkv.bias': 'in_proj_bias',
                'proj.weight': 'out_proj.weight', 'proj.bias': 'out_proj.bias'}

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.0):
        if dim % heads:
            raise ValueError(f'dim {dim} is not divisible by heads {heads}')
        super().__init__(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor):
        return super().forward(x, x, x, key_padding_mask=~key_mask, need_weights=True, average_attn_weights=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self.OLD_KEYS.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor):
        y, attn = self.attn(self.norm1(x), key_mask)
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class TransformerPool(nn.Module):
    """A [CLS] token attends over the bag through a few transformer blocks; its final state is the bag feature.

    No positional encoding: a bag is a set, and each instance already carries its scale embedding. The returned
    weights are the last block's head-averaged [CLS]-to-instance attention, renormalised over the instances.
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        check_bags(mask)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        key_mask = F.pad(mask, (1, 0), value=True)  # [CLS] is always a valid key
        attn = None
        for block in self.blocks:
            x, attn = block(x, key_mask)
        weights = attn[:, 0, 1:]
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return self.norm(x[:, 0]), weights


def create_aggregator(dim: int, cfg: dict, name: str = None) -> nn.Module:
    """Build from a config section: ``{"name": ..., "<name>": {its kwargs}}``."""
    name = name or cfg.get('name', DEFAULT_AGGREGATOR)
    kwargs = cfg.get(name, {})
    if name == 'mean':
        return MeanPool()
    if name == 'gated_attention':
        return GatedAttentionPool(dim, **kwargs)
    if name == 'transformer':
        return TransformerPool(dim, **kwargs)
    raise ValueError(f'Unknown aggregator {name!r}; choose one of {AGGREGATORS}')
