"""Parameter counts and forward+backward time per patient of an emclip model on this machine.

    python benchmarks/model_speed.py                       # offline pretrained default, bags of 16 at 224 px
    python benchmarks/model_speed.py --config tiny --bag-size 8 --batch-size 2

Three ways to train are timed, each as one contrastive step (model forward on a batch of bags and their reports,
CLIP loss, backward; no optimizer step), divided by the number of patients in the batch:

* ``frozen``: images through the frozen trunk (the config's lock_image, LiT-style), gradients for the rest;
* ``finetune``: the same with the trunk trainable (lock_image=False), gradients through the whole image tower;
* ``features``: feature-cache mode, cached trunk outputs [B, K, F] in place of images.
"""
import argparse
import math
import statistics
import time

import torch

from emclip.loss import ClipLoss
from emclip.model import build_model

REPORT = (
    'Electron microscopy: two glomeruli are examined. The glomerular basement membranes are diffusely thickened, '
    'measuring 650 to 900 nm (mean 780 nm). Podocyte foot processes show segmental effacement involving about 40% '
    'of the capillary surface. No electron-dense immune-type deposits are identified. The mesangial matrix is '
    'moderately expanded without deposits. No fibrils, tubuloreticular inclusions or microtubular structures are '
    'seen. Diagnosis: findings consistent with diabetic nephropathy.'
)


def make_batch(model, batch_size, bag_size, image_size, features):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch_size, bag_size, dtype=torch.bool)
    scales = torch.exp(torch.empty(batch_size, bag_size).uniform_(math.log(2), math.log(100), generator=g))
    batch = dict(scales=scales, mask=mask, reports=[REPORT] * batch_size)
    if features:
        batch['features'] = torch.randn(batch_size, bag_size, model.num_features, generator=g)
    else:
        batch['images'] = torch.randn(batch_size, bag_size, 3, image_size, image_size, generator=g)
    return batch


def time_step(model, batch, repeats):
    loss_fn = ClipLoss()
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels and is not counted
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(batch)
        loss_fn(out['patient'], out['report'], out['logit_scale']).backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='efficientnet_lite0_minilm')
    parser.add_argument('--batch-size', type=int, default=4, help='patients per step')
    parser.add_argument('--bag-size', type=int, default=16, help='images per patient')
    parser.add_argument('--image-size', type=int, default=None, help='default: the model preprocess size')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--modes', nargs='+', default=['frozen', 'finetune', 'features'])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(args.config).train()
    image_size = args.image_size or model.preprocess['image_size']
    print(f'model {args.config}: trunk {model.trunk_id}, F={model.num_features}, E={model.embed_dim}, '
          f'aggregator {type(model.aggregator).__name__}, scale mode {model.scale.mode}')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} patients x '
          f'{args.bag_size} images at {image_size} px, report {len(model.tokenize(REPORT)[0].nonzero())} tokens')
    print('\nparameters')
    for name, n in model.parameter_counts().items():
        print(f'  {name:<12} {n:>12,d}')

    print('\nforward + backward per patient (median of %d steps)' % args.repeats)
    for mode in args.modes:
        model.lock_image = mode != 'finetune'
        model.trunk.requires_grad_(mode == 'finetune')
        model.train()
        batch = make_batch(model, args.batch_size, args.bag_size, image_size, features=mode == 'features')
        seconds = time_step(model, batch, args.repeats)
        print(f'  {mode:<9} {seconds / args.batch_size * 1000:9.1f} ms/patient   ({seconds:.2f} s per step)')


if __name__ == '__main__':
    main()
