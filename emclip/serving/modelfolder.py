"""The exported model folder: a trained emclip model in one self-contained folder that loads with no network, no run
folder, no cohort and no pretrained-weight package.

Layout (Hugging Face style: ``huggingface_hub.upload_folder`` uploads it as is)::

    config.json        format, emclip version, the model config made buildable from the folder alone, the image
                       preprocessing, the nm/px range seen in training, logit scale, embedding width, training config
    model.safetensors  the full state dict, frozen trunk and text tower included, loaded strictly
    prompts.yaml       the zero-shot class prompts, in the format ``emclip.evaluation.zeroshot.load_prompts`` reads
    text/              config and tokenizer files of a Hugging Face text tower (its weights are in model.safetensors)
    README.md          the model card (``emclip.serving.modelcard``)
    checksums.json     SHA-256 of every other file

A folder is written atomically and read back before it takes its place: it loads, and reproduces the model's image
and text embeddings, or it is not written. Reading verifies every checksum before anything else is parsed.
See docs/model_folder.md.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .. import __version__
from ..digests import file_sha256
from ..evaluation.zeroshot import PromptSet, load_prompts
from ..model.emclip import EMClip, build_model
from ..model.weights import hub_offline, quiet_transformers, resolve_weights
from ..paths import atomic_directory
from .modelcard import model_card

__all__ = ['FORMAT', 'ModelFolderError', 'write_model_folder', 'read_model_folder', 'verify_model_folder',
           'is_model_folder', 'portable_config']

FORMAT = 'emclip-model/1'
CONFIG, WEIGHTS, PROMPTS, CARD, CHECKSUMS, TEXT = (
    'config.json', 'model.safetensors', 'prompts.yaml', 'README.md', 'checksums.json', 'text')
REQUIRED = (CONFIG, WEIGHTS, PROMPTS, CARD)
# How emclip turns a file into the trunk's input (emclip.data.images: ImageTransform and load_transformed defaults,
# which training and evaluation use): shorter side resized to image_size and centre-cropped, integer samples divided
# by their bit depth's maximum, colour converted to luminance.
IMAGE_POLICY = {'policy': 'resize', 'intensity': 'dtype', 'color': 'gray'}
# The files of a Hugging Face model folder that the architecture and tokenizer are built from (never its weights)
_TEXT_CONFIG = 'config.json'
_TOKENIZER_FILES = ('special_tokens_map.json', 'added_tokens.json', 'vocab.txt', 'vocab.json', 'merges.txt')
_PROBE_TEXT = 'Electron micrograph: podocyte foot-process effacement, GBM 450 nm (ümlaut, 2x).'
_PROBE_TOLERANCE = 1e-5


class ModelFolderError(ValueError):
    """An exported model folder cannot be written or read: damaged, incomplete, foreign, or of another format."""


# ---------------------------------------------------------------------------------------------------------- writing

def write_model_folder(model: EMClip, out: str | Path, *, prompts: PromptSet | str | Path,
                       scale_range_nm=None, train_config: dict | None = None, card: dict | None = None,
                       force: bool = False) -> Path:
    """Export ``model`` into the folder ``out`` (see the module docstring for the layout); returns ``out``.

    ``prompts``: the zero-shot classes (a PromptSet, or a prompt YAML path / bundled name). ``scale_range_nm``:
    [low, high] effective nm/px of the training images (None: not recorded). ``train_config``: the run's training
    configuration (JSON). ``card``: what the model card says beyond the model itself (``modelcard.model_card``).
    Returns the folder's absolute path.

    ``out`` must not exist or be empty; with ``force`` an existing emclip model folder is replaced, but a non-empty
    folder that is not one is never touched. The folder appears whole or not at all.
    """
    if not isinstance(model, EMClip):
        raise TypeError(f'write_model_folder exports an emclip EMClip model, got {type(model).__name__}')
    out = Path(os.path.abspath(out))   # absolute: "." or ".." name the folder they stand for
    _check_target(out, force)
    prompts = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
    if not prompts.templates:
        raise ModelFolderError('the prompts have no templates: give at least "{}"')
    model_config, sources, text_files = portable_config(model.config)
    config = {
        'format': FORMAT,
        'emclip_version': __version__,
        'model_config': model_config,
        'pretrained_sources': sources,
        'preprocess': {**{k: list(v) if isinstance(v, tuple) else v for k, v in model.preprocess.items()},
                       **IMAGE_POLICY},
        'scale_range_nm': _scale_range(scale_range_nm),
        'logit_scale': float(model.logit_scale.detach().exp()),
        'logit_bias': None if model.logit_bias is None else float(model.logit_bias.detach()),
        'embed_dim': int(model.embed_dim),
        'train_config': train_config,
    }
    config_text = _strict_json(config, 'config.json (train_config)')
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        save_file(_full_state(model), str(tmp / WEIGHTS), metadata={'format': FORMAT})
        (tmp / PROMPTS).write_text(prompts_yaml(prompts), encoding='utf-8')
        for name, source in text_files.items():
            (tmp / TEXT).mkdir(exist_ok=True)
            shutil.copyfile(source, tmp / TEXT / name)
        (tmp / CONFIG).write_text(config_text, encoding='utf-8')
        sums = {rel: file_sha256(tmp / rel) for rel in _files(tmp)}
        sizes = {rel: (tmp / rel).stat().st_size for rel in sums}
        card_text = model_card(model, config, prompts, {rel: (sums[rel], sizes[rel]) for rel in sums}, card or {},
                               folder_name=out.name)
        (tmp / CARD).write_text(card_text, encoding='utf-8')
        sums[CARD] = file_sha256(tmp / CARD)
        (tmp / CHECKSUMS).write_text(json.dumps(dict(sorted(sums.items())), indent=2) + '\n', encoding='utf-8')
        _check_reproduces(model, tmp, prompts)
    return out


def portable_config(config: dict) -> tuple[dict, dict, dict]:
    """(model config that builds from the export folder alone, the references it was built from (pretrained image
    weights, Hugging Face text model and tokenizer), text files to bundle as {name in text/: source path}).

    Pretrained weights are never loaded (``load_pretrained: false``, open_clip ``pretrained: null``): every weight
    comes from model.safetensors. A Hugging Face text tower's model and tokenizer references point at ``text/``.
    """
    cfg = copy.deepcopy(config)
    cfg.pop('checkpoint', None)
    sources = {}
    if 'open_clip' in cfg:
        if cfg['open_clip'].get('pretrained'):
            sources['open_clip_pretrained'] = str(cfg['open_clip']['pretrained'])
        return _portable_open_clip(cfg), sources, {}
    if cfg.get('load_pretrained', True) and cfg.get('image_weights'):
        sources['image_weights'] = str(cfg['image_weights'])
    cfg.pop('image_weights', None)
    cfg['load_pretrained'] = False
    text_cfg = cfg.get('text_cfg') or {}
    files = {}
    model_ref, tokenizer_ref = text_cfg.get('hf_model_name'), text_cfg.get('hf_tokenizer_name')
    if model_ref:
        sources['text_model'] = str(model_ref)
        files[_TEXT_CONFIG] = _hf_folder(model_ref, 'text model') / _TEXT_CONFIG
        text_cfg['hf_model_name'] = TEXT
    if tokenizer_ref:
        sources['text_tokenizer'] = str(tokenizer_ref)
        folder = _hf_folder(tokenizer_ref, 'tokenizer')
        files.update({f.name: f for f in sorted(folder.iterdir()) if f.is_file() and _is_tokenizer_file(f.name)})
        text_cfg['hf_tokenizer_name'] = TEXT
    return cfg, sources, files


def _portable_open_clip(cfg: dict) -> dict:
    """An open_clip-named model builds offline from open_clip's own architecture table when its text side is open_clip's
    (BPE tokenizer in the wheel); hub, local-dir and Hugging Face text models would need files this folder lacks."""
    import open_clip
    name = str(cfg['open_clip']['model_name'])
    arch = None if ':' in name else open_clip.get_model_config(name)
    if arch is None:
        raise ModelFolderError(f'open_clip model {name!r} is not one of open_clip\'s built-in architectures: an export '
                               f'could not rebuild it offline')
    if any(key.startswith('hf_') and value for key, value in (arch.get('text_cfg') or {}).items()):
        raise ModelFolderError(f'open_clip model {name!r} uses a Hugging Face text model or tokenizer: an export of it '
                               f'is not supported (its files would have to be bundled)')
    cfg['open_clip']['pretrained'] = None
    return cfg


def _hf_folder(ref: str, what: str) -> Path:
    folder = Path(resolve_weights(ref))
    if not folder.is_dir() or (what == 'text model' and not (folder / _TEXT_CONFIG).is_file()):
        raise ModelFolderError(f'the {what} {ref!r} is not a local Hugging Face folder (resolved to {folder}): an '
                               f'export bundles its config and tokenizer files and needs them on disk')
    return folder


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith('tokenizer') or name in _TOKENIZER_FILES or name.endswith(('.model', '.tiktoken'))


def _check_target(out: Path, force: bool) -> None:
    """Refuse to write over anything that is not an empty folder or, with ``force``, an emclip model folder."""
    if out.is_symlink():
        raise ModelFolderError(f'{out} is a symbolic link: give the real folder to export into')
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelFolderError(f'{out} exists and is not a folder: choose another output folder')
    if not any(out.iterdir()):
        return
    if not is_model_folder(out):
        raise ModelFolderError(f'{out} is a non-empty folder that is not an emclip model folder: it is left as it is '
                               f'(force replaces only an earlier export); choose another output folder')
    if not force:
        raise ModelFolderError(f'{out} already holds an emclip model folder: pass force=True (--force) to replace it')


def _scale_range(scale_range_nm) -> list[float] | None:
    if scale_range_nm is None:
        return None
    try:
        low, high = (float(v) for v in scale_range_nm)
    except (TypeError, ValueError):
        raise ModelFolderError(f'scale_range_nm must be [low, high] nm/px, got {scale_range_nm!r}') from None
    if not (0 < low <= high < float('inf')):
        raise ModelFolderError(f'scale_range_nm must satisfy 0 < low <= high (finite), got [{low}, {high}]')
    return [low, high]


def _strict_json(value, what: str) -> str:
    try:
        return json.dumps(value, indent=2, allow_nan=False, ensure_ascii=False) + '\n'
    except (TypeError, ValueError) as err:
        raise ModelFolderError(f'{what} is not plain JSON ({err})') from None


def _full_state(model: EMClip) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, frozen ones included, as separate contiguous CPU tensors (safetensors refuses
    tensors that share memory)."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.data_ptr() in seen:
            value = value.clone()
        seen.add(value.data_ptr())
        state[key] = value
    return state


def prompts_yaml(prompts: PromptSet) -> str:
    """The PromptSet as the YAML that ``load_prompts`` reads back into an equal PromptSet."""
    spec = {'templates': list(prompts.templates),
            'classes': [{'name': c, 'synonyms': list(prompts.synonyms[c])} for c in prompts.classes]}
    head = ('# Zero-shot classes of this model: every synonym is put into every template ("{}" marks the place),\n'
            '# each text is embedded, and a class embedding is the re-normalised mean of its texts.\n')
    return head + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=1000)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())


@torch.no_grad()
def _probe(model: EMClip, texts: list[str]) -> list[torch.Tensor]:
    """Embeddings of two seeded random images at two scales (one bag) and of ``texts``, in eval mode."""
    size = int(model.preprocess['image_size'])
    images = torch.rand(1, 2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bags = model.encode_bags(torch.tensor([[4.0, 30.0]]), torch.ones(1, 2, dtype=torch.bool), images=images)
    return [bags.patient, bags.instances, bags.attention, model.encode_text(texts)]


def _check_reproduces(model: EMClip, folder: Path, prompts: PromptSet) -> None:
    """Load the written folder as a user would and compare its embeddings with the model's: an export that does not
    reproduce the model is never published."""
    texts = [prompts.texts(c)[0] for c in prompts.classes] + [_PROBE_TEXT]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        expected = _probe(model, texts)
    finally:
        for module, training in modes.items():
            module.training = training
    copy_, _ = read_model_folder(folder, device=model.device)
    for name, want, got in zip(('patient', 'image', 'attention', 'text'), expected, _probe(copy_, texts)):
        gap = float((want - got).abs().max())
        if not gap <= _PROBE_TOLERANCE:
            raise ModelFolderError(f'the exported folder does not reproduce the model: {name} embeddings differ by '
                                   f'{gap:.2e}; nothing was written')


# ---------------------------------------------------------------------------------------------------------- reading

def is_model_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder whose config.json declares this format (cheap: nothing else is read)."""
    config = Path(path) / CONFIG
    try:
        return config.is_file() and json.loads(config.read_text(encoding='utf-8')).get('format') == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def verify_model_folder(path: str | Path) -> dict:
    """Check every file against checksums.json, then the format; returns config.json's contents.

    Raises ModelFolderError naming the folder, the file and what to do (export again or download again).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f'model folder {folder} does not exist' if not folder.exists() else
                               f'{folder} is not a folder (an exported emclip model is a folder)')
    sums = _read_checksums(folder)
    damaged = 'the folder is damaged or incomplete: export the model again or download it again'
    for rel in [*REQUIRED, *(r for r in sums if r not in REQUIRED)]:
        if rel not in sums:
            raise ModelFolderError(f'{folder}: {CHECKSUMS} does not list {rel}; {damaged}')
        file = folder / rel
        if not file.is_file():
            raise ModelFolderError(f'{folder}: {rel} is missing; {damaged}')
        if file_sha256(file) != sums[rel]:
            raise ModelFolderError(f'{folder}: {rel} does not match its SHA-256 in {CHECKSUMS} (changed or damaged); '
                                   f'{damaged}')
    if (folder / TEXT).is_dir():   # a file slipped into text/ would change what the tokenizer loads
        extra = [rel for rel in _files(folder) if rel.startswith(f'{TEXT}/') and rel not in sums]
        if extra:
            raise ModelFolderError(f'{folder}: {extra[0]} is not part of the export ({CHECKSUMS} does not list it); '
                                   f'remove it, or export the model again')
    config = _read_config(folder)
    if config.get('format') != FORMAT:
        found = config.get('format')
        raise ModelFolderError(f'{folder / CONFIG}: format {found!r} is not one this emclip ({__version__}) reads '
                               f'({FORMAT}); ' + ('upgrade emclip or export the model again' if found else
                                                  'this is not an emclip model folder'))
    return config


def read_model_folder(path: str | Path, device=None) -> tuple[EMClip, dict]:
    """(model in eval mode on ``device`` (default CPU), info) from an exported folder, verified first.

    The model is built from config.json alone, offline: no Hub access, no pretrained-weight package; every weight
    comes from model.safetensors, loaded strictly. ``info`` is config.json's contents plus ``prompts`` (a PromptSet)
    and ``path``.
    """
    folder = Path(path)
    config = verify_model_folder(folder)
    model_config = copy.deepcopy(config.get('model_config'))
    if not isinstance(model_config, dict):
        raise ModelFolderError(f'{folder / CONFIG}: "model_config" is missing; export the model again')
    text_cfg = model_config.get('text_cfg') or {}
    for key in ('hf_model_name', 'hf_tokenizer_name'):
        if text_cfg.get(key) == TEXT:
            text_cfg[key] = str((folder / TEXT).resolve())
    try:
        with hub_offline(), quiet_transformers():
            model = build_model(model_config)
    except (OSError, ImportError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ModelFolderError(f'{folder}: the model of {CONFIG} cannot be built ({type(err).__name__}: '
                               f'{str(err).splitlines()[0] if str(err) else ""})') from err
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    except Exception as err:  # noqa: BLE001 - safetensors and load_state_dict raise their own types
        raise ModelFolderError(f'{folder / WEIGHTS} does not fit the model of {CONFIG} '
                               f'({str(err).splitlines()[0] if str(err) else type(err).__name__}); export it again'
                               ) from err
    try:
        prompts = load_prompts(folder / PROMPTS)
    except ValueError as err:
        raise ModelFolderError(f'{folder / PROMPTS}: {err}') from err
    model.to(torch.device(device) if device is not None else torch.device('cpu')).eval()
    return model, dict(config, prompts=prompts, path=folder)


def _read_checksums(folder: Path) -> dict[str, str]:
    file = folder / CHECKSUMS
    if not file.is_file():
        if not is_model_folder(folder):
            raise ModelFolderError(f'{folder} is not an emclip model folder (no {CONFIG} declaring format {FORMAT})')
        raise ModelFolderError(f'{folder}: {CHECKSUMS} is missing; the folder is damaged or incomplete: export the '
                               f'model again or download it again')
    try:
        sums = json.loads(file.read_text(encoding='utf-8'))
    except (OSError, ValueError) as err:
        raise ModelFolderError(f'{file} cannot be read ({err}); export the model again or download it again') from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise ModelFolderError(f'{file} is not a {{file: sha256}} object; export the model again')
    for rel in sums:
        if rel.startswith('/') or '..' in Path(rel).parts or rel == CHECKSUMS:
            raise ModelFolderError(f'{file} lists {rel!r}, which is not a file of the folder; export the model again')
    return sums


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text(encoding='utf-8'))
    except (OSError, ValueError) as err:
        raise ModelFolderError(f'{folder / CONFIG} cannot be read ({err})') from None
    if not isinstance(config, dict):
        raise ModelFolderError(f'{folder / CONFIG} is not a JSON object')
    return config
