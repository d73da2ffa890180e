"""Scale conditioning: every mode starts as its scale-blind arm, the arms differ only by the scale input, and the
interaction modes can learn what the additive mode provably cannot (a label that depends on feature x scale)."""
import math

import pytest
import torch
import torch.nn.functional as F

from emclip.model import build_model
from emclip.model.scale import SCALE_MODES, ScaleConditioning

FEATURE_MODES = [m for m in SCALE_MODES if m != 'trunk']


def _tiny(seed=0, model='tiny', **kwargs):
    torch.manual_seed(seed)
    return build_model(model, **kwargs).eval()


def _bags(n_bags=6, k=5, dim=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, k + 1, (n_bags,), generator=g)
    mask = torch.arange(k)[None] < sizes[:, None]
    scales = torch.exp(torch.rand(n_bags, k, generator=g) * math.log(50)) * 2
    return torch.randn(n_bags, k, dim, generator=g), scales, mask


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))


@pytest.mark.parametrize('mode', FEATURE_MODES)
@pytest.mark.parametrize('aggregator,attention', [('mean', False), ('gated_attention', False),
                                                  ('gated_attention', True), ('transformer', False)])
def test_fresh_aware_model_is_its_blind_arm(mode, aggregator, attention):
    kwargs = dict(scale_mode=mode, aggregator=aggregator, scale_attention=attention)
    aware, blind = _tiny(scale_embed=True, **kwargs), _tiny(scale_embed=False, **kwargs)
    feats, scales, mask = _bags()
    with torch.no_grad():
        a, b = aware.encode_bags(scales, mask, features=feats), blind.encode_bags(scales, mask, features=feats)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # same extra layers in both arms: they differ by exactly the scale-input parameters
    ca, cb = aware.parameter_counts(), blind.parameter_counts()
    assert ca['scale_embed'] > 0 and cb['scale_embed'] == 0
    assert ca['total'] - ca['scale_embed'] == cb['total'] and ca['scale_layers'] == cb['scale_layers']
    assert (ca['scale_layers'] > 0) == (mode != 'add')
    # and the check can fail: once the scale input has learnt something, the aware arm reads images differently
    _perturb(aware.scale_embed)
    with torch.no_grad():
        moved = aware.encode_bags(scales, mask, features=feats)
    assert not torch.allclose(moved.instances, b.instances) or attention
    if attention:   # the scorer's scale terms change the weights, not the per-image embeddings
        assert not torch.allclose(moved.attention, b.attention)


def test_mode_layers_train_in_the_blind_arm_too():
    blind = _tiny(scale_embed=False, scale_mode='mlp').train()
    feats, scales, mask = _bags()
    blind.encode_bags(scales, mask, features=feats).patient.sum().backward()
    grads = [p.grad for p in blind.scale.layers.parameters()]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_film_is_identity_then_modulates_per_scale():
    cond = ScaleConditioning(8, {'mode': 'film', 'sincos': {'dim': 8}})
    h = torch.randn(2, 3, 8)
    s = torch.tensor([[2.0, 10.0, 100.0], [4.0, 4.0, 50.0]])
    assert torch.equal(cond(h, s), h)
    _perturb(cond.embeds)
    out = cond(h, s)
    # a multiplicative, scale-dependent change: the same feature is read differently at 2 and 100 nm/px
    # (an additive shift cancels in the difference; only a gain that depends on the scale survives)
    same = h[:, :1].expand(2, 3, 8).clone()
    gain = (cond(2 * same, s) - cond(same, s)) / same
    assert not torch.allclose(gain[0, 0], gain[0, 2]) and not torch.allclose(out, h)


def test_the_scale_input_is_log_nm_per_px_over_the_cohort_range():
    """u = log(nm/px) squashed so 2 and 100 nm/px land on -1 and 1: equal ratios are equal steps (2 -> 4 nm/px is
    as far as 25 -> 50 nm/px), which is what makes a thin GBM at 10 nm/px comparable with a normal one at 20."""
    from emclip.model.scale import LogScaleNorm
    u = LogScaleNorm((2.0, 100.0))(torch.tensor([2.0, math.sqrt(200.0), 100.0, 4.0, 25.0, 50.0]))
    assert torch.allclose(u[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    step = 2 * math.log(2) / math.log(50)       # one doubling of nm/px; the half-width is log(100/2) / 2
    assert float(u[3] - u[0]) == pytest.approx(step, abs=1e-6) and float(u[5] - u[4]) == pytest.approx(step, abs=1e-6)


@pytest.mark.parametrize('mode', FEATURE_MODES)
def test_the_blind_arm_ignores_the_scale_whatever_its_weights(mode):
    """Blind means blind after training too: with every weight moved, changing the images' nm/px changes nothing,
    while the aware arm with the same perturbation reads the same features differently."""
    blind, aware = _tiny(scale_embed=False, scale_mode=mode), _tiny(scale_embed=True, scale_mode=mode)
    assert blind.scale_embed is None or sum(p.numel() for p in blind.scale_embed.parameters()) == 0
    feats, scales, mask = _bags()
    for model in (blind, aware):
        torch.manual_seed(1)
        _perturb(model)
    with torch.no_grad():
        b1, b2 = (blind.encode_bags(s, mask, features=feats).patient for s in (scales, scales * 7))
        a1, a2 = (aware.encode_bags(s, mask, features=feats).patient for s in (scales, scales * 7))
    assert torch.equal(b1, b2)
    assert not torch.allclose(a1, a2, atol=1e-5)


@pytest.mark.parametrize('mode', FEATURE_MODES)
def test_scale_attention_weighs_images_by_their_scale(mode):
    """scale_attention: the scale enters the gated-attention scorer itself. Its own embedding, once learnt, moves
    the attention weights and leaves the per-image embeddings as they were."""
    model = _tiny(scale_embed=True, scale_mode=mode, aggregator='gated_attention', scale_attention=True)
    feats, scales, mask = _bags()
    with torch.no_grad():
        before = model.encode_bags(scales, mask, features=feats)
        torch.manual_seed(2)
        _perturb(model.scale.embeds['attention'])
        after = model.encode_bags(scales, mask, features=feats)
    assert torch.equal(after.instances, before.instances)
    assert not torch.allclose(after.attention, before.attention, atol=1e-5)
    assert torch.allclose(after.attention.sum(1), torch.ones(len(feats)), atol=1e-5)   # still weights per bag


def test_unknown_mode_and_attention_without_gated_attention_are_refused():
    with pytest.raises(ValueError, match='Unknown scale mode'):
        ScaleConditioning(8, {'mode': 'concat'})
    with pytest.raises(ValueError, match='gated_attention'):
        _tiny(scale_attention=True, aggregator='mean')
    with pytest.raises(ValueError, match='ViT image trunk'):
        _tiny(scale_mode='trunk')   # the tiny EfficientNet trunk has no token sequence


# --- scale inside a ViT trunk (end-to-end) ---------------------------------------------------------------------

def test_scale_in_vit_trunk_starts_blind_and_then_reads_the_scale():
    aware, blind = _tiny(model='tiny_vit', scale_mode='trunk'), _tiny(model='tiny_vit', scale_mode='trunk',
                                                                      scale_embed=False)
    assert aware.scale_in_trunk and not blind.scale_in_trunk
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 3, 32, 32, generator=g)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    scales = torch.tensor([[2.0, 20.0, 90.0], [5.0, 1.0, 1.0]])
    with torch.no_grad():
        a = aware.encode_bags(scales, mask, images=images)
        b = blind.encode_bags(scales, mask, images=images)
        assert torch.equal(a.patient, b.patient) and torch.equal(a.instances, b.instances)
        assert aware.trunk_id == blind.trunk_id   # the token embedding is the scale module's, not the trunk's
        _perturb(aware.scale_embed)
        same_image = images[:1, :1].expand(1, 3, 3, 32, 32)
        moved = aware.encode_bags(scales[:1], mask[:1], images=same_image).instances[0]
        assert not torch.allclose(moved[0], moved[2], atol=1e-4)   # one image, two scales, two readings
        ca, cb = aware.parameter_counts(), blind.parameter_counts()
        assert ca['total'] - ca['scale_embed'] == cb['total']
        with pytest.raises(ValueError, match='needs scales'):
            aware.encode_trunk(images[0])
        with pytest.raises(ValueError, match='mode=e2e'):
            aware.encode_bags(scales, mask, features=torch.zeros(2, 3, aware.num_features))
    # and the token embedding trains with the trunk
    aware.train()
    aware.encode_bags(scales, mask, images=images).patient.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in aware.scale_embed.parameters())


# --- interaction capacity ---------------------------------------------------------------------------------------

def interaction_task(n_bags: int, dim: int, seed: int, k: int = 8):
    """Bags whose label depends only on which pixel size is seen at which scale.

    Each image shows a structure whose size in pixels is small or big (two fixed feature directions + noise) at a
    low or high nm/px (two log-bands, jittered). Its physical size = pixel size x nm/px is then small, medium or
    large, and a bag is "normal" (label 1) when its structure is medium-sized: big-at-low or small-at-high; else
    (label 0) it is small-at-low or big-at-high. Every bag has k/2 images in each scale band. So under both labels
    the images' features have the same distribution and so do their scales; only the pairing of feature and
    scale differs. Any model whose bag vector is f(mean of features) + g(multiset of scales) (the blind model,
    and the additive mode with a linear projection and mean pooling) gets identically distributed bag vectors for
    both labels and is at chance, whatever it learns.
    """
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(1234)), dim=-1) * 3
    labels = torch.randint(0, 2, (n_bags,), generator=g)
    band = torch.stack([torch.randperm(k, generator=g) % 2 for _ in range(n_bags)])    # 0: low, 1: high nm/px
    big = torch.where(labels[:, None] == 1, 1 - band, band)
    feats = directions[big] + 0.3 * torch.randn(n_bags, k, dim, generator=g)
    low = torch.exp(math.log(3) + torch.rand(n_bags, k, generator=g) * math.log(2))     # 3-6 nm/px
    high = torch.exp(math.log(30) + torch.rand(n_bags, k, generator=g) * math.log(2))   # 30-60 nm/px
    scales = torch.where(band == 0, low, high)
    return feats, scales, torch.ones(n_bags, k, dtype=torch.bool), labels


def fit_interaction_task(model, steps: int = 250, seed: int = 0) -> float:
    """Train the image side + two class embeddings contrastively-style (cosine logits, cross-entropy) on the task;
    return held-out accuracy."""
    torch.manual_seed(seed)
    feats, scales, mask, labels = interaction_task(512, model.num_features, seed=seed)
    test = interaction_task(400, model.num_features, seed=seed + 100)
    classes = torch.nn.Parameter(torch.randn(2, model.embed_dim))
    params = [p for n, p in model.named_parameters() if not n.startswith(('trunk.', 'text.'))] + [classes]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (64,))
        patient = model.encode_bags(scales[idx], mask[idx], features=feats[idx]).patient
        loss = F.cross_entropy(10 * patient @ F.normalize(classes, dim=-1).T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        patient = model.encode_bags(test[1], test[2], features=test[0]).patient
        pred = (patient @ F.normalize(classes, dim=-1).T).argmax(1)
    return float((pred == test[3]).float().mean())


@pytest.mark.parametrize('mode,aware,attention,aggregator,learns', [
    ('add', False, False, 'mean', False),
    ('add', True, False, 'mean', False),             # today's additive mode: provably at chance
    ('film', False, False, 'mean', False),
    ('mlp', False, False, 'mean', False),            # the same extra layers without the scale: still at chance
    ('film', True, False, 'mean', True),
    ('mlp', True, False, 'mean', True),
    ('add', True, True, 'gated_attention', True),    # the scale steers which images are read
])
def test_interaction_capacity(mode, aware, attention, aggregator, learns):
    model = _tiny(scale_mode=mode, scale_embed=aware, scale_attention=attention, aggregator=aggregator)
    accuracy = fit_interaction_task(model)
    if learns:
        assert accuracy >= 0.95, accuracy
    else:
        assert accuracy <= 0.65, accuracy


@pytest.mark.slow
def test_scale_in_trunk_trains_end_to_end_and_evaluates(tmp_path, tiny_cohort):
    """The ViT-token mode through the real training loop (mode=e2e) and the evaluation that reads the run."""
    import json

    from emclip.evaluation.cached import evaluate_run
    from emclip.train import load_config, train
    run = tmp_path / 'run'
    cfg = load_config('ci', dict(data_dir=str(tiny_cohort), run_dir=str(run), cache_dir=str(tmp_path / 'cache'),
                                 model='tiny_vit', mode='e2e', scale_mode='trunk', batch_size=4, epochs=1,
                                 max_instances=3))
    train(cfg)
    params = json.loads((run / 'run_info.json').read_text())['parameters']
    assert params['scale_embed'] > 0
    metrics = evaluate_run(run, n_boot=10, figures=False)
    assert metrics['n_patients'] == 3 and 0 <= metrics['zero_shot']['patient']['roc_auc_macro_ovr']['value'] <= 1
    with pytest.raises(ValueError, match='mode=e2e'):
        load_config('ci', dict(scale_mode='trunk'))
