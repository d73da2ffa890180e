"""One rank of the 2-process loss test; launch: torchrun --standalone --nproc_per_node 2 dist_loss_worker.py OUT_DIR.

Every rank builds the same small model (a linear layer per modality + learnable temperature, and a bias for
SigLIP) and the same global batch, takes its slice, computes emclip's loss under DDP (gloo) and backpropagates.
It then computes the single-process reference on the whole batch with open_clip's loss, and writes the largest
differences of loss and of every parameter's gradient to OUT_DIR/rank{r}.json. The same run with a gather that
drops the gradient (what ``accelerator.gather`` does: patched in for torch.distributed.nn.all_gather, which
open_clip's losses call) is recorded too, to show the comparison can fail.
"""
import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from emclip import loss as emloss

LOCAL_BATCH, DIM_IN, DIM_OUT = 4, 6, 5


class TwoTower(nn.Module):
    def __init__(self, siglip: bool):
        super().__init__()
        self.image = nn.Linear(DIM_IN, DIM_OUT)
        self.text = nn.Linear(DIM_IN, DIM_OUT)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def forward(self, x_image, x_text):
        return F.normalize(self.image(x_image), dim=-1), F.normalize(self.text(x_text), dim=-1)


def no_grad_gather(x):
    """What accelerator.gather / dist.all_gather give: the right values, but no gradient for other ranks' rows."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x  # own rows keep their gradient, as in open_clip without gather_with_grad
    return parts


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def run(kind: str, loss_fn, rank: int, world: int, broken: bool = False):
    siglip = kind == 'siglip'
    torch.manual_seed(0)
    reference = TwoTower(siglip).double()
    x_image = torch.randn(LOCAL_BATCH * world, DIM_IN, dtype=torch.float64)
    x_text = torch.randn(LOCAL_BATCH * world, DIM_IN, dtype=torch.float64)

    # single process, whole batch, open_clip's loss as the independent reference
    img, txt = reference(x_image, x_text)
    ref_loss_fn = OpenSigLipLoss() if siglip else OpenClipLoss()
    extra = (reference.logit_bias,) if siglip else ()
    ref_loss = ref_loss_fn(img, txt, reference.logit_scale.exp(), *extra)
    ref_loss.backward()
    ref_grads = grads(reference)

    # N processes under DDP, each with its slice of the batch
    model = DDP(copy.deepcopy(reference))
    model.zero_grad()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    img, txt = model(x_image[rows], x_text[rows])
    extra = (model.module.logit_bias,) if siglip else ()
    saved = torch.distributed.nn.all_gather
    if broken:
        torch.distributed.nn.all_gather = no_grad_gather
    try:
        loss = loss_fn(img, txt, model.module.logit_scale.exp(), *extra)
    finally:
        torch.distributed.nn.all_gather = saved
    loss.backward()  # DDP averages the gradients over ranks here
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    global_loss /= world
    dist_grads = grads(model.module)
    return dict(
        loss_diff=abs(global_loss.item() - ref_loss.item()),
        grad_diff={n: (dist_grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads},
        grad_scale={n: ref_grads[n].abs().max().item() for n in ref_grads},
    )


def main(out_dir: str):
    # built before the process group exists, as the trainer may: emclip's losses read rank and world size per call
    losses = {'clip': emloss.ClipLoss(), 'siglip': emloss.SigLipLoss()}
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    result = dict(world_size=world)
    for kind in ('clip', 'siglip'):
        result[kind] = run(kind, losses[kind], rank, world)
        result[kind + '_no_grad_gather'] = run(kind, losses[kind], rank, world, broken=True)
    Path(out_dir, f'rank{rank}.json').write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
