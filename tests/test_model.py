"""Model: masked aggregation is exact, the scale embedding starts as a no-op, the tiny model trains end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from emclip.model import AGGREGATORS, SCALE_ENCODINGS, BagEmbeddings, build_model, create_aggregator
from emclip.model.aggregators import MaskedSelfAttention
from emclip.model.scale import ScaleEmbed

SIZES = [5, 2, 1, 3]  # bag sizes in one padded batch, K = 5


def _padded_bags(dim=8, sizes=SIZES, seed=0):
    """Random instances where padding holds random junk too, so ignoring it is a real test."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(sizes), max(sizes), dim, generator=g, dtype=torch.float64)
    mask = torch.arange(max(sizes))[None, :] < torch.tensor(sizes)[:, None]
    return x, mask


def _aggregator(name, dim=8):
    torch.manual_seed(0)
    cfg = {'gated_attention': {'hidden_dim': 6}, 'transformer': {'layers': 2, 'heads': 2}}
    return create_aggregator(dim, cfg, name).double().eval()


@pytest.mark.parametrize('name', AGGREGATORS)
def test_masked_pooling_equals_each_bag_alone(name):
    agg = _aggregator(name)
    x, mask = _padded_bags()
    pooled, weights = agg(x, mask)
    assert torch.all(weights[~mask] == 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(len(SIZES), dtype=torch.float64), rtol=0, atol=1e-12)
    for b, n in enumerate(SIZES):
        alone, alone_w = agg(x[b:b + 1, :n], torch.ones(1, n, dtype=torch.bool))
        torch.testing.assert_close(pooled[b], alone[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(weights[b, :n], alone_w[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize('name', AGGREGATORS)
def test_unmasked_padding_changes_the_result(name):
    agg = _aggregator(name)
    x, mask = _padded_bags()
    pooled, _ = agg(x, mask)
    leaky, _ = agg(x, torch.ones_like(mask))
    for b, n in enumerate(SIZES):
        diff = (pooled[b] - leaky[b]).abs().max().item()
        assert (diff > 1e-3) if n < mask.shape[1] else (diff < 1e-12)


@pytest.mark.parametrize('name', AGGREGATORS)
def test_empty_bag_raises_naming_rows(name):
    agg = _aggregator(name)
    x, mask = _padded_bags()
    mask[1] = False
    mask[3] = False
    with pytest.raises(ValueError, match=r'\[1, 3\]'):
        agg(x, mask)


def _old_attention(x, key_mask, w, heads):
    """The hand-written attention MaskedSelfAttention was before it became torch's, on its old-layout weights."""
    b, n, d = x.shape
    q, k, v = F.linear(x, w['qkv.weight'], w['qkv.bias']).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).masked_fill(~key_mask[:, None, None, :], -math.inf)
    attn = scores.softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, w['proj.weight'], w['proj.bias']), attn.mean(1)


def _to_old_layout(state):
    new_to_old = {new: old for old, new in MaskedSelfAttention.OLD_KEYS.items()}
    out = {}
    for key, value in state.items():
        head, _, tail = key.rpartition('.attn.')
        ours = head.startswith('aggregator.') and tail in new_to_old   # the text tower's attention is open_clip's
        out[f'{head}.attn.{new_to_old[tail]}' if ours else key] = value.clone()
    return out


def test_masked_self_attention_equals_old_formulation():
    g = torch.Generator().manual_seed(0)
    old = {'qkv.weight': torch.randn(24, 8, generator=g), 'qkv.bias': torch.randn(24, generator=g),
           'proj.weight': torch.randn(8, 8, generator=g), 'proj.bias': torch.randn(8, generator=g)}
    old = {k: v.double() for k, v in old.items()}
    attn = MaskedSelfAttention(8, heads=2).double().eval()
    attn.load_state_dict(old)                             # strict: every old key is mapped, none left over
    x, mask = _padded_bags()
    out, weights = attn(x, mask)
    want, want_weights = _old_attention(x, mask, old, heads=2)
    torch.testing.assert_close(out[mask], want[mask], rtol=0, atol=1e-12)   # padded queries are never read
    torch.testing.assert_close(weights[mask], want_weights[mask], rtol=0, atol=1e-12)


def test_transformer_checkpoint_in_old_layout_loads(tmp_path):
    from safetensors.torch import save_file

    from emclip.train.checkpoint import _frozen_keys, load_model_weights
    trained = _tiny(seed=0, aggregator='transformer').eval()
    old = _to_old_layout({k: v for k, v in trained.state_dict().items() if k not in _frozen_keys(trained)})
    assert any('.attn.qkv.weight' in k for k in old) and not any('aggregator' in k and 'in_proj' in k for k in old)
    save_file(old, str(tmp_path / 'model.safetensors'))
    fresh = _tiny(seed=1, aggregator='transformer').eval()
    load_model_weights(fresh, tmp_path, verify=False)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def _tiny(seed=0, model='tiny', **kwargs):
    torch.manual_seed(seed)
    return build_model(model, **kwargs)


def _batch(sizes=(4, 1, 3), k=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(k)[None, :] < torch.tensor(sizes)[:, None]
    scales = torch.exp(torch.rand(len(sizes), k, generator=g) * math.log(50)) * 2
    scales[~mask] = 1.0  # the data side's padding value
    images = torch.randn(len(sizes), k, 3, size, size, generator=g) * mask[..., None, None, None]
    reports = ['Diffuse effacement of foot processes.', 'The basement membrane measures 210 nm.',
               'Subepithelial electron-dense deposits with spikes.'][:len(sizes)]
    return dict(images=images, scales=scales, mask=mask, reports=reports, patient_ids=[str(i) for i in sizes],
                diagnoses=[None] * len(sizes))


def test_contract_shapes_and_preprocess():
    model = _tiny()
    assert model.preprocess == dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3)
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 1e-6
    batch = _batch()
    out = model(batch)
    b, k = batch['mask'].shape
    e = model.embed_dim
    assert out['patient'].shape == (b, e) and out['report'].shape == (b, e)
    assert out['instances'].shape == (b, k, e) and out['attention'].shape == (b, k)
    torch.testing.assert_close(out['patient'].norm(dim=-1), torch.ones(b))
    torch.testing.assert_close(out['report'].norm(dim=-1), torch.ones(b))
    norms = out['instances'].norm(dim=-1)
    torch.testing.assert_close(norms[batch['mask']], torch.ones(int(batch['mask'].sum())))
    assert torch.all(norms[~batch['mask']] == 0) and torch.all(out['attention'][~batch['mask']] == 0)
    assert torch.isclose(out['logit_scale'], torch.tensor(1 / 0.07))
    assert model.encode_trunk(batch['images'][0]).shape == (k, model.num_features)
    bags = model.encode_bags(batch['scales'], batch['mask'], images=batch['images'])
    assert isinstance(bags, BagEmbeddings)


@pytest.mark.parametrize('aggregator', AGGREGATORS)
def test_model_padded_bag_equals_bag_alone(aggregator):
    model = _tiny(aggregator=aggregator).double().eval()
    batch = _batch()
    images = batch['images'].double()
    with torch.no_grad():
        bags = model.encode_bags(batch['scales'], batch['mask'], images=images)
        for b, n in enumerate(batch['mask'].sum(1).tolist()):
            alone = model.encode_bags(batch['scales'][b:b + 1, :n], torch.ones(1, n, dtype=torch.bool),
                                      images=images[b:b + 1, :n])
            torch.testing.assert_close(bags.patient[b], alone.patient[0], rtol=0, atol=1e-12)
            torch.testing.assert_close(bags.instances[b, :n], alone.instances[0], rtol=0, atol=1e-12)


def test_feature_cache_mode_equals_image_mode():
    model = _tiny().double().eval()
    batch = _batch()
    images, mask = batch['images'].double(), batch['mask']
    with torch.no_grad():
        from_images = model.encode_bags(batch['scales'], mask, images=images)
        feats = model.encode_trunk(images.flatten(0, 1)).view(*mask.shape, -1)
        feats[~mask] = float('nan')  # whatever a cache holds in padding must not leak
        from_features = model.encode_bags(batch['scales'], mask, features=feats)
    for a, b in zip(from_images, from_features):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize('encoding', SCALE_ENCODINGS)
def test_fresh_scale_embedding_is_the_baseline(encoding):
    batch = _batch()
    aware, blind = _tiny(scale_embed=True, scale_encoding=encoding), _tiny(scale_embed=False)
    assert aware.scale_embed is not None and blind.scale_embed is None
    aware.eval(), blind.eval()
    with torch.no_grad():
        out_aware, out_blind = aware(batch), blind(batch)
        for key in ('patient', 'report', 'instances', 'attention'):
            assert torch.equal(out_aware[key], out_blind[key]), key
        # the check can fail: once the scale embedding has learnt something, the outputs differ
        for p in aware.scale_embed.parameters():
            p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(aware(batch)['patient'], out_blind['patient'])


@pytest.mark.parametrize('encoding', SCALE_ENCODINGS)
def test_scale_embedding_is_zero_but_trainable(encoding):
    torch.manual_seed(0)
    embed = ScaleEmbed(12, encoding=encoding, dim=8, bins=6)
    scales = torch.tensor([[2.0, 10.0, 100.0], [1.0, 500.0, 33.0]])
    out = embed(scales)
    assert out.shape == (2, 3, 12) and torch.all(out == 0)
    (out * torch.randn_like(out)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in embed.parameters())
    with torch.no_grad():
        for p in embed.parameters():
            p.normal_()
    varied = embed(scales)
    assert not torch.allclose(varied[0, 0], varied[0, 2])  # 2 nm/px and 100 nm/px are told apart


@pytest.mark.parametrize('aggregator', AGGREGATORS)
def test_forward_backward_variable_bags(aggregator):
    from emclip.loss import ClipLoss
    model = _tiny(aggregator=aggregator).train()
    batch = _batch(sizes=(4, 1, 3))
    out = model(batch)
    loss = ClipLoss()(out['patient'], out['report'], out['logit_scale'])
    loss = loss + out['instances'].sum() * 0  # instances are part of the graph as well
    loss.backward()
    assert torch.isfinite(loss)
    parts = ('trunk', 'image_proj', 'text', 'scale_embed') + (('aggregator',) if aggregator != 'mean' else ())
    for part in parts:  # mean pooling has no parameters
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_all_masked_bag_raises():
    model = _tiny()
    batch = _batch(sizes=(3, 0, 2))
    with pytest.raises(ValueError, match=r'row\(s\) \[1\]'):
        model(batch)
    feats = torch.randn(3, 4, model.num_features)
    with pytest.raises(ValueError, match='Empty bag'):
        model.encode_bags(batch['scales'], batch['mask'], features=feats)


def test_logit_scale_clamp_and_siglip_init():
    model = _tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0
    siglip = _tiny(loss='siglip')
    assert siglip.logit_scale.item() == pytest.approx(math.log(10)) and siglip.logit_bias.item() == -10
    assert 'logit_bias' in siglip(_batch()) and model.logit_bias is None


def test_trunk_id_tracks_weights():
    a, b = _tiny(seed=0), _tiny(seed=0)
    assert a.trunk_id == b.trunk_id and a.trunk_id.startswith('timm:test_efficientnet|random|32px|')
    assert _tiny(seed=1).trunk_id != a.trunk_id
    with torch.no_grad():
        next(b.trunk.parameters()).add_(1e-3)
    assert b.trunk_id != a.trunk_id


def test_frozen_trunk_stays_frozen():
    model = _tiny(lock_image=True).train()
    assert not model.trunk.training and model.aggregator.training
    assert not any(p.requires_grad for p in model.trunk.parameters())
    counts = model.parameter_counts()
    assert counts['trainable'] == counts['total'] - counts['trunk']


def test_config_from_json_path_and_dict(tmp_path):
    from emclip.model import load_model_config
    cfg = load_model_config('tiny')
    cfg['embed_dim'] = 24
    path = tmp_path / 'my_model.json'
    path.write_text(json.dumps(cfg))
    for spec in (str(path), cfg):
        model = _tiny(model=spec, aggregator='transformer', scale_encoding='binned')
        assert model.embed_dim == 24 and model.scale_embed['feature'].encoding_name == 'binned'
        assert type(model.aggregator).__name__ == 'TransformerPool'
        assert model(_batch())['patient'].shape == (3, 24)


def test_native_open_clip_tower_starts_aligned():
    """A non-timm open_clip image tower is the whole trunk; its projection starts as the identity."""
    cfg = {
        'embed_dim': 16,
        'vision_cfg': {'image_size': 32, 'patch_size': 16, 'width': 32, 'layers': 1, 'head_width': 16},
        'text_cfg': {'context_length': 16, 'width': 32, 'heads': 2, 'layers': 1},
        'scale': {'sincos': {'dim': 8}}, 'aggregator': {'name': 'mean'},
    }
    model = _tiny(model=cfg).eval()
    batch = _batch()
    with torch.no_grad():
        out = model(batch)
        direct = torch.nn.functional.normalize(model.trunk(batch['images'][0]), dim=-1)
    torch.testing.assert_close(out['instances'][0], direct)
    assert model.trunk_id.startswith('open_clip:custom|random|32px|')


def test_local_checkpoints(tmp_path):
    """A saved emclip state dict, and a local timm trunk file, load back exactly."""
    trained = _tiny(seed=1)
    path = tmp_path / 'model.pt'
    torch.save(trained.state_dict(), path)
    torch.save(trained.trunk.state_dict(), tmp_path / 'trunk.pt')
    restored = _tiny(seed=2, checkpoint=str(path))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), restored.state_dict().values()))
    trunk_only = _tiny(seed=2, image_weights=str(tmp_path / 'trunk.pt'))
    assert trunk_only.trunk_id.split('|')[-1] == trained.trunk_id.split('|')[-1]
    assert str(tmp_path / 'trunk.pt') in trunk_only.trunk_id


def test_in_order_mapping_refuses_mismatches():
    from collections import OrderedDict

    from emclip.model.weights import map_state_dict_in_order
    target = OrderedDict([('bn.weight', torch.ones(3)), ('bn.bias', torch.zeros(3)), ('fc.weight', torch.ones(2, 3))])
    good = OrderedDict([('_bn0.weight', torch.rand(3)), ('_bn0.bias', torch.rand(3)), ('_fc.weight', torch.rand(2, 3))])
    mapped = map_state_dict_in_order(good, target)
    assert list(mapped) == list(target) and torch.equal(mapped['bn.bias'], good['_bn0.bias'])
    swapped = OrderedDict([('_bn0.bias', good['_bn0.bias']), ('_bn0.weight', good['_bn0.weight']),
                           ('_fc.weight', good['_fc.weight'])])
    with pytest.raises(ValueError, match='Cannot map'):
        map_state_dict_in_order(swapped, target)  # equal shapes, but a bias is not a weight
    with pytest.raises(ValueError, match='3 target'):
        map_state_dict_in_order(OrderedDict(list(good.items())[:2]), target)


def test_hub_offline_is_scoped(monkeypatch):
    import os

    from huggingface_hub import constants

    from emclip.model.weights import hub_offline
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    before = constants.HF_HUB_OFFLINE
    with hub_offline():
        assert os.environ['HF_HUB_OFFLINE'] == '1' and constants.HF_HUB_OFFLINE is True
    assert 'HF_HUB_OFFLINE' not in os.environ and constants.HF_HUB_OFFLINE == before


def test_text_split_and_cached_text_features():
    """pooled + project is open_clip's encode_text; cached pooled features give the same report embeddings."""
    model = _tiny(lock_text=True).eval()
    batch = _batch()
    tokens = model.tokenize(batch['reports'])
    with torch.no_grad():
        torch.testing.assert_close(model.text(tokens), model.text.clip.encode_text(tokens), rtol=0, atol=0)
        pooled = model.encode_text_pooled(batch['reports'])
        assert pooled.shape == (3, 32)
        out = model(dict(batch, text_features=pooled))
        torch.testing.assert_close(out['report'], model(batch)['report'])
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable == {'clip.text_projection'}
