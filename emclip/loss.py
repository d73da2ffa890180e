"""Contrastive losses that give the same loss and gradients on N processes as on one process with the whole batch.

Both are open_clip's own classes: ``ClipLoss(local_loss=True, gather_with_grad=True)`` and ``SigLipLoss`` with the
``gather`` exchange. Distributed recipe ("local loss with gathered features"): every rank gathers all ranks'
embeddings *with gradient* (``torch.distributed.nn.all_gather``, whose backward sums the incoming gradients and
hands each rank the slice of its own rows), then scores only its own rows against all columns, with targets offset
by ``batch_size * rank``. Summed over ranks these local losses are N times the global loss, and DDP averages
gradients over ranks, so the update equals the single-process one.

``accelerator.gather`` / ``dist.all_gather`` return tensors without gradient: negatives from other ranks would then
push nothing back, silently changing the gradient (and with one process they pass tensors through, so
single-process tests cannot catch it). Every rank needs the same batch size: use ``drop_last=True`` for training.

What emclip adds (the thin layer below): open_clip fixes ``rank`` / ``world_size`` when the loss is built, but the
trainer builds its loss before accelerate has necessarily set up the process group, so ours are read at every call.
"""
import math
from typing import Optional, Tuple

import torch.distributed as dist
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss
from torch import nn


def world_info(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """(rank, world_size) as given, else from an initialised process group, else (0, 1)."""
    if world_size is not None:
        return rank or 0, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _WorldAtCall:
    """Sets open_clip's ``rank`` / ``world_size`` at each call: as forced at construction, else from the process
    group (``world_size=1`` computes a purely local loss, e.g. on embeddings already gathered)."""

    def forward(self, *args, **kwargs):
        self.rank, self.world_size = world_info(*self.forced)
        return super().forward(*args, **kwargs)


class ClipLoss(_WorldAtCall, OpenClipLoss):
    """Symmetric InfoNCE: (CE(s·I Tᵀ, diag) + CE(s·T Iᵀ, diag)) / 2, with s = exp(t) passed in as ``logit_scale``;
    call as ``loss(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``."""

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__(local_loss=True, gather_with_grad=True)
        self.forced = (rank, world_size)


class SigLipLoss(_WorldAtCall, OpenSigLipLoss):
    """Sigmoid loss (Zhai et al. 2023): -Σ_ij log σ(y_ij (s·i_iᵀt_j + b)) / B, y = +1 on matched pairs, -1 elsewhere;
    needs the learnable bias (SigLIP initialises t = ln 10, b = -10). Distributed: local images against every
    rank's texts, gathered with gradient (open_clip's ``gather``: the same collective as ClipLoss)."""

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__(dist_impl='gather')
        self.forced = (rank, world_size)


# initial (t, bias) per loss: CLIP's ln(1/0.07) without bias; SigLIP's ln 10 with bias -10 (sigmoid needs a prior
# that most pairs are negatives)
LOSS_INIT = {'clip': (math.log(1 / 0.07), None), 'siglip': (math.log(10.0), -10.0)}


def create_loss(name: str = 'clip', **kwargs) -> nn.Module:
    if name == 'clip':
        return ClipLoss(**kwargs)
    if name == 'siglip':
        return SigLipLoss(**kwargs)
    raise ValueError(f'Unknown loss {name!r}; choose "clip" or "siglip"')
