"""Packed bags: ``encode_bags`` runs its per-instance layers on the real instances only and pools them per bag; the
result, forward values and the gradient of every parameter, equals the padded + masked computation it replaced."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import emclip.model.emclip as emclip_module
import emclip.model.scale as scale_module
from emclip.data import collate_bags
from emclip.model import build_model
from emclip.model.scale import ScaleEmbed
from emclip.model.aggregators import Packed

SIZES = (3, 1, 5, 2, 1)  # mixed bag sizes in one padded batch, K = 5
FEATURE_MODES = ('add', 'film', 'mlp')
AGGREGATORS = ('mean', 'gated_attention', 'transformer')


def padded_reference(model, scales, mask, images=None, features=None):
    """The previous ``encode_bags``: every layer on the padded [B, K, ...] layout, padding masked in the pooling."""
    if features is None:
        feats = model.encode_trunk(images[mask], scales[mask])
        h = feats.new_zeros(*mask.shape, feats.shape[-1])
        h[mask] = feats
    else:
        h = features.masked_fill(~mask[..., None], 0)
    z = model.image_proj(model.scale(h, scales))
    context = model.scale.attention_context(scales)
    pooled, attention = model.aggregator(z, mask) if context is None else model.aggregator(z, mask, context)
    return F.normalize(pooled, dim=-1), F.normalize(z, dim=-1).masked_fill(~mask[..., None], 0), attention


_BUILT = {}


def _model(model='tiny', **kwargs):
    key = (model, tuple(sorted(kwargs.items())))
    if key not in _BUILT:  # building (the text tower, its tokenizer) is most of a test's time: once per config
        torch.manual_seed(0)
        _BUILT[key] = build_model(model, **kwargs)
    net = copy.deepcopy(_BUILT[key]).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the scale layers start at zero (and the mlp's last layer): make every path count
        for p in list(net.scale.parameters()) + list(net.aggregator.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _bags(sizes=SIZES, dim=256, seed=0, images=False):
    g = torch.Generator().manual_seed(seed)
    k = max(sizes)
    mask = torch.arange(k)[None, :] < torch.tensor(sizes)[:, None]
    scales = torch.exp(torch.rand(len(sizes), k, generator=g, dtype=torch.float64) * math.log(50)) * 2
    scales[~mask] = 1.0
    if images:
        data = torch.randn(len(sizes), k, 3, 32, 32, generator=g, dtype=torch.float64)
    else:
        data = torch.randn(len(sizes), k, dim, generator=g, dtype=torch.float64).relu()
    data[~mask] = float('nan')  # padding may hold anything; the packed path must never read it
    return scales, mask, data


def _weights(outputs, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outputs]


def _run(net, fn, weights):
    """Outputs of ``fn(net)`` and the gradient of every parameter of a fixed random linear function of them."""
    net.zero_grad(set_to_none=True)
    outputs = fn(net)
    sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
    return [o.detach() for o in outputs], {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_equal_to_padded(net, scales, mask, instances=True, tol=1e-10, **data):
    """The packed ``encode_bags`` against ``padded_reference``: values and every parameter's gradient."""
    ref_net, new_net = copy.deepcopy(net), copy.deepcopy(net)
    pad_data = {k: v.masked_fill(~mask.view(*mask.shape, *[1] * (v.dim() - 2)), 0) for k, v in data.items()}
    ref_out = padded_reference(ref_net, scales, mask, **pad_data)
    keep = (0, 1, 2) if instances else (0, 2)
    weights = _weights([ref_out[i] for i in keep])
    ref, ref_grads = _run(ref_net, lambda m: [padded_reference(m, scales, mask, **pad_data)[i] for i in keep], weights)
    routes = [data]
    if 'features' in data:  # the features already packed, as collate_bags(padded=False) gives them
        routes.append(dict(packed_features=data['features'][mask]))
    for route in routes:
        got, grads = _run(copy.deepcopy(new_net),
                          lambda m: [m.encode_bags(scales, mask, instances=instances, **route)[i] for i in keep],
                          weights)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert set(grads) == set(ref_grads) and grads
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=tol, atol=tol * scale, msg=f'gradient of {name}')


@pytest.mark.parametrize('aggregator', AGGREGATORS)
@pytest.mark.parametrize('mode', FEATURE_MODES)
@pytest.mark.parametrize('aware', [True, False])
def test_packed_features_equal_padded(mode, aggregator, aware, monkeypatch):
    net = _model(scale_mode=mode, aggregator=aggregator, scale_embed=aware)
    scales, mask, feats = _bags()
    for fold_from in (0, 10 ** 9):  # the add mode's folded projection and the plain one
        monkeypatch.setattr(emclip_module, 'FOLD_MIN_INSTANCES', fold_from)
        monkeypatch.setattr(scale_module, 'FUSE_MIN_INSTANCES', fold_from)  # fused mlp too
        for instances in (True, False):
            assert_equal_to_padded(net, scales, mask, instances=instances, features=feats)


@pytest.mark.parametrize('mode', FEATURE_MODES)
@pytest.mark.parametrize('encoding', ['sincos', 'fourier', 'binned'])
def test_packed_with_scale_attention_and_every_encoding(mode, encoding, monkeypatch):
    net = _model(scale_mode=mode, aggregator='gated_attention', scale_attention=True, scale_encoding=encoding)
    scales, mask, feats = _bags()
    for fold_from in (0, 10 ** 9):
        monkeypatch.setattr(emclip_module, 'FOLD_MIN_INSTANCES', fold_from)
        monkeypatch.setattr(scale_module, 'FUSE_MIN_INSTANCES', fold_from)  # fused mlp too
        assert_equal_to_padded(net, scales, mask, features=feats)
    net = _model(scale_mode=mode, aggregator='mean', scale_encoding=encoding)
    for fold_from in (0, 10 ** 9):
        monkeypatch.setattr(emclip_module, 'FOLD_MIN_INSTANCES', fold_from)
        monkeypatch.setattr(scale_module, 'FUSE_MIN_INSTANCES', fold_from)  # fused mlp too
        assert_equal_to_padded(net, scales, mask, instances=False, features=feats)


@pytest.mark.parametrize('sizes', [(1,), (1, 1, 1), (4,), (2, 7)])
@pytest.mark.parametrize('aggregator', AGGREGATORS)
def test_packed_single_and_unit_bags(sizes, aggregator, monkeypatch):
    monkeypatch.setattr(emclip_module, 'FOLD_MIN_INSTANCES', 0)
    monkeypatch.setattr(scale_module, 'FUSE_MIN_INSTANCES', 0)  # fused mlp too
    for mode in FEATURE_MODES:
        net = _model(scale_mode=mode, aggregator=aggregator)
        scales, mask, feats = _bags(sizes)
        for instances in (True, False):
            assert_equal_to_padded(net, scales, mask, instances=instances, features=feats)


@pytest.mark.parametrize('mode,aggregator,attention', [
    ('mlp', 'mean', False), ('add', 'gated_attention', True), ('film', 'transformer', False),
    ('mlp', 'gated_attention', False)])
def test_packed_images_equal_padded(mode, aggregator, attention):
    net = _model(scale_mode=mode, aggregator=aggregator, scale_attention=attention).train()  # BN batch statistics
    scales, mask, images = _bags(images=True)
    for instances in (True, False):
        assert_equal_to_padded(net, scales, mask, instances=instances, tol=1e-9, images=images)


@pytest.mark.parametrize('aggregator', AGGREGATORS)
def test_packed_scale_in_vit_trunk_equals_padded(aggregator):
    net = _model('tiny_vit', scale_mode='trunk', aggregator=aggregator).train()
    scales, mask, images = _bags(images=True)
    for instances in (True, False):
        assert_equal_to_padded(net, scales, mask, instances=instances, tol=1e-9, images=images)


def test_packed_frozen_trunk_folds_like_cached_features(monkeypatch):
    monkeypatch.setattr(emclip_module, 'FOLD_MIN_INSTANCES', 0)
    monkeypatch.setattr(scale_module, 'FUSE_MIN_INSTANCES', 0)  # fused mlp too
    net = _model(scale_mode='add', aggregator='gated_attention', lock_image=True).eval()
    scales, mask, images = _bags(images=True)
    assert_equal_to_padded(net, scales, mask, tol=1e-9, images=images)


def test_packed_in_float32_and_layout_of_the_outputs():
    torch.manual_seed(0)
    net = build_model('tiny', aggregator='gated_attention')
    scales, mask, feats = _bags()
    bags = net.encode_bags(scales.float(), mask, features=feats.float())
    ref = padded_reference(net, scales.float(), mask, features=feats.float().nan_to_num())
    torch.testing.assert_close(bags.patient, ref[0])
    torch.testing.assert_close(bags.instances, ref[1])
    torch.testing.assert_close(bags.attention, ref[2])
    assert torch.all(bags.instances[~mask] == 0) and torch.all(bags.attention[~mask] == 0)
    assert torch.isfinite(bags.patient).all()  # NaN padding never entered
    lean = net.encode_bags(scales.float(), mask, features=feats.float(), instances=False)
    assert lean.instances is None
    torch.testing.assert_close(lean.patient, bags.patient)


def test_forward_without_instances_leaves_them_out():
    torch.manual_seed(0)
    net = build_model('tiny')
    scales, mask, feats = _bags()
    batch = dict(scales=scales.float(), mask=mask, features=feats.float(), reports=['a', 'b', 'c', 'd', 'e'])
    full, lean = net(batch), net(batch, instances=False)
    assert 'instances' in full and 'instances' not in lean
    torch.testing.assert_close(lean['patient'], full['patient'])
    torch.testing.assert_close(lean['attention'], full['attention'])


def test_packed_layout_is_bag_by_bag():
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    packed = Packed.of(mask)
    assert packed.bag.tolist() == [0, 0, 1, 2, 2, 2] and packed.slot.tolist() == [0, 1, 0, 0, 1, 2]
    x = torch.arange(6, dtype=torch.float64)[:, None]
    torch.testing.assert_close(packed.mean(x), torch.tensor([[0.5], [2.0], [4.0]], dtype=torch.float64))
    assert packed.pad(x)[..., 0].tolist() == [[0, 1, 0], [2, 0, 0], [3, 4, 5]]
    with pytest.raises(ValueError, match=r'\[1\]'):
        Packed.of(torch.tensor([[True], [False]]))


def _items(sizes, dim=7, images=False):
    g = torch.Generator().manual_seed(3)
    key, shape = ('images', (3, 4, 4)) if images else ('features', (dim,))
    return [{key: torch.randn(n, *shape, generator=g), 'scales': torch.rand(n, generator=g) + 1,
             'nm_per_pixel': torch.rand(n, generator=g) + 1, 'image_index': torch.arange(n), 'report': f'r{i}',
             'patient_id': f'P{i}', 'diagnosis': '', 'image_paths': []} for i, n in enumerate(sizes)]


def test_collate_packed_features_are_the_real_rows_in_mask_order():
    items = _items((3, 1, 4))
    padded, packed = collate_bags(items), collate_bags(items, padded=False)
    assert 'features' not in packed and 'packed_features' not in padded
    torch.testing.assert_close(packed['packed_features'], padded['features'][padded['mask']], rtol=0, atol=0)
    for key in ('scales', 'nm_per_pixel', 'mask', 'image_index'):
        assert torch.equal(packed[key], padded[key])
    images = collate_bags(_items((2, 1), images=True), padded=False)  # images are always padded
    assert images['images'].shape == (2, 2, 3, 4, 4) and 'packed_features' not in images


def test_forward_reads_packed_features_and_checks_them():
    torch.manual_seed(0)
    net = build_model('tiny')
    items = _items((3, 1, 5, 2), dim=net.num_features)
    padded, packed = collate_bags(items), collate_bags(items, padded=False)
    full, lean = net(padded, instances=False), net(packed, instances=False)
    torch.testing.assert_close(lean['patient'], full['patient'])
    with pytest.raises(ValueError, match='packed_features'):
        net.encode_bags(packed['scales'], packed['mask'], packed_features=packed['packed_features'][1:])
    with pytest.raises(ValueError, match='one of'):
        net.encode_bags(packed['scales'], packed['mask'], packed_features=packed['packed_features'],
                        features=padded['features'])


@pytest.mark.parametrize('encoding', ['sincos', 'fourier', 'binned'])
def test_scale_embed_fused_add_and_pooled(encoding):
    torch.manual_seed(0)
    embed = ScaleEmbed(6, encoding=encoding, dim=4).double()
    with torch.no_grad():
        for p in embed.parameters():
            p.add_(torch.randn_like(p))
    h, s = torch.randn(5, 6, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 50 + 2
    torch.testing.assert_close(embed.add_to(h, s), h + embed(s))
    packed = Packed.of(torch.tensor([[True, True, False], [True, True, True]]))
    torch.testing.assert_close(embed.pooled(s, packed.mean), packed.mean(embed(s)))


def test_fused_mlp_from_its_threshold_on_in_float32(monkeypatch):
    """At the default threshold a batch of 100 real instances runs the fused LayerNorm + linear: the same patient
    embeddings and gradients, in float32, as the plain layers."""
    assert scale_module.FUSE_MIN_INSTANCES <= 100
    torch.manual_seed(0)
    net = build_model('tiny')
    with torch.no_grad():
        for p in net.scale.parameters():
            p.add_(0.3 * torch.randn_like(p))
    scales, mask, feats = _bags(sizes=(40, 1, 59), dim=net.num_features)
    scales, feats = scales.float(), feats.float()[mask]
    weights = _weights([net.encode_bags(scales, mask, packed_features=feats, instances=False).patient])
    runs = []
    for fuse_from in (scale_module.FUSE_MIN_INSTANCES, 10 ** 9):
        monkeypatch.setattr(scale_module, 'FUSE_MIN_INSTANCES', fuse_from)
        runs.append(_run(copy.deepcopy(net), lambda m: [m.encode_bags(scales, mask, packed_features=feats,
                                                                      instances=False).patient], weights))
    (fused, fused_grads), (plain, plain_grads) = runs
    torch.testing.assert_close(fused[0], plain[0])
    assert set(fused_grads) == set(plain_grads)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-7,
                                   msg=name)
