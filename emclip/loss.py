"""Contrastive losses that give the same loss and gradients on N processes as on one process with the whole batch.

Distributed recipe ("local loss with gathered features", as in open_clip with local_loss + gather_with_grad):
every rank gathers all ranks' embeddings *with gradient* (``torch.distributed.nn.functional.all_gather``, whose
backward sums the incoming gradients and hands each rank the slice of its own rows), then scores only its own rows
against all columns, with targets offset by ``batch_size * rank``. Summed over ranks these local losses are N times
the global loss, and DDP averages gradients over ranks, so the update equals the single-process one.

``accelerator.gather`` / ``dist.all_gather`` return tensors without gradient: negatives from other ranks would then
push nothing back, silently changing the gradient (and with one process they pass tensors through, so
single-process tests cannot catch it). Every rank needs the same batch size: use ``drop_last=True`` for training.
"""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_info(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """(rank, world_size) as given, else from an initialised process group, else (0, 1)."""
    if world_size is not None:
        return rank or 0, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, differentiably."""
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over L2-normalised image (patient) and text (report) features.

    loss = (CE(s·I Tᵀ, diag) + CE(s·T Iᵀ, diag)) / 2 with s = exp(t) passed in as ``logit_scale``. With no
    arguments it runs on one process, or on all ranks of an initialised torch.distributed process group.
    ``rank`` / ``world_size`` force a setting (``world_size=1`` computes a purely local loss).
    """

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            logit_bias: Optional[torch.Tensor] = None,
            output_dict: bool = False,
    ):
        rank, world_size = world_info(self.rank, self.world_size)
        if world_size > 1:
            all_image, all_text = gather_with_grad(image_features), gather_with_grad(text_features)
        else:
            all_image, all_text = image_features, text_features
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        batch_size = image_features.shape[0]
        labels = torch.arange(batch_size, device=image_features.device) + batch_size * rank
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {'contrastive_loss': loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Sigmoid loss (Zhai et al. 2023): every image-text pair is an independent binary problem.

    loss = -Σ_ij log σ(y_ij (s·i_iᵀt_j + b)) / B with y = +1 on matched pairs and -1 elsewhere; needs the learnable
    bias ``logit_bias`` (SigLIP initialises t = ln 10, b = -10). Distributed: local images against all ranks' texts.
    """

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            logit_bias: torch.Tensor,
            output_dict: bool = False,
    ):
        rank, world_size = world_info(self.rank, self.world_size)
        all_text = gather_with_grad(text_features) if world_size > 1 else text_features
        logits = logit_scale * image_features @ all_text.T + logit_bias
        batch_size = image_features.shape[0]
        rows = torch.arange(batch_size, device=logits.device)
        signs = -torch.ones_like(logits)
        signs[rows, rows + batch_size * rank] = 1
        loss = -F.logsigmoid(signs * logits).sum() / batch_size
        return {'contrastive_loss': loss} if output_dict else loss


# initial (t, bias) per loss: CLIP's ln(1/0.07) without bias; SigLIP's ln 10 with bias -10 (sigmoid needs a prior
# that most pairs are negatives)
LOSS_INIT = {'clip': (math.log(1 / 0.07), None), 'siglip': (math.log(10.0), -10.0)}


def create_loss(name: str = 'clip', **kwargs) -> nn.Module:
    if name == 'clip':
        return ClipLoss(**kwargs)
    if name == 'siglip':
        return SigLipLoss(**kwargs)
    raise ValueError(f'Unknown loss {name!r}; choose "clip" or "siglip"')
