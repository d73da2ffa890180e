"""The learning-rate schedule: open_clip_train's warmup + cosine, as a LambdaLR whose state checkpoints keep."""
import math

import pytest
import torch

from emclip.train.loop import cosine_with_warmup


def _lrs(make, steps, lr=0.1):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup, total", [(5, 40), (2, 9), (1, 6)])
def test_lr_sequence_equals_open_clip_cosine_lr(warmup, total):
    scheduler = pytest.importorskip("open_clip_train.scheduler")
    ours = _lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, cosine_with_warmup(warmup, total)), total)
    p = torch.nn.Parameter(torch.zeros(1))
    adjust = scheduler.cosine_lr(torch.optim.SGD([p], lr=0.1), 0.1, warmup, total)
    theirs = [adjust(step) for step in range(total)]
    assert ours == pytest.approx(theirs, rel=0, abs=1e-15)
    assert ours[0] == pytest.approx(0.1 / warmup) and ours[warmup] == pytest.approx(0.1)


def test_lr_sequence_formula_and_edges():
    lrs = _lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, cosine_with_warmup(2, 6)), 8)
    want = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)] + [0.0, 0.0]
    assert lrs == pytest.approx(want, abs=1e-15)   # past ``total`` it stays at 0
    assert _lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, cosine_with_warmup(0, 4)), 1) == [0.1]


def test_scheduler_state_round_trips_mid_run():
    make = lambda o: torch.optim.lr_scheduler.LambdaLR(o, cosine_with_warmup(3, 10))  # noqa: E731
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make(opt)
    for _ in range(4):
        opt.step()
        sched.step()
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = make(opt2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    rest = []
    for _ in range(6):
        opt2.step()
        sched2.step()
        rest.append(opt2.param_groups[0]["lr"])
    assert rest == pytest.approx(_lrs(make, 11)[5:], abs=1e-15)
