"""Losses: equal to open_clip on one process, and exact across 2 real processes (gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from emclip.loss import ClipLoss, SigLipLoss, create_loss

REPO = Path(__file__).resolve().parents[1]


def _features(n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return img, txt


def _value_and_grads(loss_fn, img, txt, *args):
    img, txt = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    loss = loss_fn(img, txt, *args)
    loss.backward()
    return loss.detach(), img.grad, txt.grad


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_clip_loss_equals_open_clip(seed):
    img, txt = _features(seed=seed)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    ours, theirs = _value_and_grads(ClipLoss(), img, txt, scale), _value_and_grads(OpenClipLoss(), img, txt, scale)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and it is not trivially equal to something else: swapping the text order changes it
    assert abs(ClipLoss()(img, txt.flip(0), scale).item() - ours[0].item()) > 1e-3


def test_clip_loss_matches_formula():
    img, txt = _features(n=4)
    logits = 20.0 * img @ txt.T
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(ClipLoss()(img, txt, torch.tensor(20.0)), expected)


def test_siglip_loss_equals_open_clip():
    img, txt = _features()
    args = (torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    ours, theirs = _value_and_grads(SigLipLoss(), img, txt, *args), _value_and_grads(OpenSigLipLoss(), img, txt, *args)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_create_loss():
    assert isinstance(create_loss('clip'), ClipLoss) and isinstance(create_loss('siglip'), SigLipLoss)
    # open_clip's own classes, configured for the exact distributed recipe
    clip = create_loss('clip')
    assert isinstance(clip, OpenClipLoss) and clip.local_loss and clip.gather_with_grad
    assert isinstance(create_loss('siglip'), OpenSigLipLoss)
    with pytest.raises(ValueError):
        create_loss('triplet')


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(REPO / 'tests' / 'dist_loss_worker.py'), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert result['world_size'] == 2
        for kind in ('clip', 'siglip'):
            exact, broken = result[kind], result[kind + '_no_grad_gather']
            assert exact['loss_diff'] < 1e-12, (rank, kind)
            assert set(exact['grad_diff']) >= {'image.weight', 'text.weight', 'logit_scale'}
            for name, diff in exact['grad_diff'].items():
                assert diff < 1e-12, (rank, kind, name, diff)
            # the same comparison catches a gather without gradient: values agree, gradients are off by far more
            # than rounding (SigLIP less so: with bias -10 the negatives carry small gradients at this init)
            assert broken['loss_diff'] < 1e-12
            assert max(broken['grad_diff'][n] / broken['grad_scale'][n] for n in ('image.weight', 'text.weight')) > 1e-3
