"""The emclip model: a bag of EM images at known physical scales, and one report, in one joint space.

    image x_k --trunk--> h_k [F] --scale conditioning (nm/px_k)--> --image_proj--> z_k [E] --aggregator--> bag [E]
    report    --text tower (open_clip)--> r [E]

``config["scale"]["mode"]`` says where the scale enters (``add``, ``film``, ``mlp``, or ``trunk`` inside a ViT; see
``scale.ScaleConditioning``), ``config["scale"]["attention"]`` whether it also reaches the gated-attention scorer.

Both levels live in the report space: ``instances`` = normalise(z_k) for image-level retrieval and zero-shot,
``patient`` = normalise(pooled z) for the patient-level contrastive loss. ``scale_embed=False`` is the scale-blind
baseline with everything else identical, including the extra layers of the chosen mode; with the scale embedding
freshly initialised (zero), both arms compute the same function from the same seed.
"""
import copy
import math
from typing import Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import LOSS_INIT
from .aggregators import DEFAULT_AGGREGATOR, MeanPool, Packed, create_aggregator, pool_packed
from .scale import ScaleConditioning
from .towers import DEFAULT_MODEL, build_towers, load_model_config
from .weights import load_checkpoint, state_digest

LOGIT_SCALE_MAX = math.log(100.0)
# From this many packed instances on, the add mode's scale embedding is folded into a linear projection: the fold
# costs a fixed E x F x d product (and its gradient) per call and saves ~F x (d + E) per instance, so it pays off
# above ~140 instances (docs/benchmarks.md, section 1); a small bag alone runs the plain layers.
FOLD_MIN_INSTANCES = 140


class BagEmbeddings(NamedTuple):
    patient: torch.Tensor  # [B, E] L2-normalised bag embeddings
    instances: Optional[torch.Tensor]  # [B, K, E] L2-normalised image embeddings, padding rows zero (None: skipped)
    attention: torch.Tensor  # [B, K] aggregator weights, zero on padding


class EMClip(nn.Module):
    """Scale-aware multiple-instance CLIP. Build it with ``build_model``; ``config`` is the resolved dict."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = copy.deepcopy(config)
        towers = build_towers(self.config)
        self.trunk = towers.trunk
        self.image_proj = towers.image_proj
        self.text = towers.text
        self.tokenizer = towers.tokenizer
        self.num_features, self.embed_dim = towers.num_features, towers.embed_dim
        self._preprocess, self._trunk_name = towers.preprocess, towers.trunk_name

        self.aggregator = create_aggregator(self.embed_dim, self.config.get('aggregator', {}))
        # the loss fixes the temperature (and bias) initialisation unless the config sets them
        init_scale, init_bias = LOSS_INIT[self.config.get('loss', 'clip')]
        init_scale = self.config.get('init_logit_scale', init_scale)
        init_bias = self.config.get('init_logit_bias', init_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias))) if init_bias is not None else None

        scale_cfg = self.config.get('scale', {})
        agg_cfg = self.config.get('aggregator', {})
        attention_dim = 0
        if agg_cfg.get('name', DEFAULT_AGGREGATOR) == 'gated_attention':
            attention_dim = agg_cfg.get('gated_attention', {}).get('hidden_dim', 128)
        # Built last and on a forked RNG, so that creating it leaves every other initialisation unchanged: a
        # scale-aware and a scale-blind model from one seed differ only in the scale embedding.
        with torch.random.fork_rng(devices=[]):
            self.scale = ScaleConditioning(self.num_features, scale_cfg, aware=scale_cfg.get('enabled', True),
                                           attention_dim=attention_dim)
            self.scale.attach_trunk(self.trunk, scale_cfg)

        # NHWC runs depthwise/pointwise convolutions markedly faster on CPU (oneDNN) and with AMP on GPU
        self.channels_last = bool(self.config.get('channels_last', False))
        if self.channels_last:
            self.trunk.to(memory_format=torch.channels_last)
        self.lock_image = bool(self.config.get('lock_image', False))
        if self.lock_image:
            self.trunk.requires_grad_(False)
            self.trunk.eval()
        if self.config.get('lock_text', False):
            self.text.lock()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock_image:
            self.trunk.eval()  # a frozen trunk keeps its BN statistics: features stay those of the feature cache
        return self

    @property
    def preprocess(self) -> dict:
        """What the image trunk expects: image_size (square side), per-channel mean and std, 3 channels."""
        return dict(self._preprocess, channels=3)

    @property
    def trunk_id(self) -> str:
        """Architecture | weights | input size | digest of the current trunk weights (keys a feature cache)."""
        return f'{self._trunk_name}|{state_digest(self.trunk)}'

    @property
    def scale_embed(self) -> Optional[nn.Module]:
        """The scale-input layers (zero at initialisation), None in the scale-blind arm."""
        return self.scale.embedding

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def scale_in_trunk(self) -> bool:
        """True when the trunk itself reads the scale (its features then cannot be cached scale-free)."""
        return self.scale.mode == 'trunk' and self.scale.aware

    def encode_trunk(self, images: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Trunk features [N, F] of preprocessed images [N, C, H, W] (and their nm/px [N] when the scale enters the
        trunk), before scale conditioning and projection."""
        if images.dim() != 4:
            raise ValueError(f'encode_trunk expects [N, C, H, W] images, got shape {tuple(images.shape)}')
        images = images.to(self.device, memory_format=torch.channels_last if self.channels_last else None)
        if not self.scale_in_trunk:
            return self.trunk(images)
        if scales is None or scales.shape != images.shape[:1]:
            raise ValueError('this model reads the scale inside its trunk: encode_trunk needs scales [N] too')
        with self.scale.trunk_scales(scales.to(self.device)):
            return self.trunk(images)

    def encode_bags(
            self,
            scales: torch.Tensor,
            mask: torch.Tensor,
            images: Optional[torch.Tensor] = None,
            features: Optional[torch.Tensor] = None,
            instances: bool = True,
            packed_features: Optional[torch.Tensor] = None,
    ) -> BagEmbeddings:
        """Embed padded bags from images [B, K, C, H, W] or cached trunk features [B, K, F] (or their real rows
        already packed, ``packed_features`` [N, F] in mask order: ``collate_bags(..., padded=False)``).

        Only the real instances are computed: they are packed ([N, F] = h[mask]), every per-instance layer runs on
        them, and the aggregator pools them per bag (``aggregators.pool_packed``); the result equals each bag
        computed alone. ``instances=False`` skips the image-level embeddings (``instances`` is then None; training
        needs only ``patient``): with mean pooling and a linear projection the bag is then pooled before the
        projection, W·mean(x) + b = mean(W·x + b), and the mlp mode's last layer also runs per bag.
        """
        mask, scales = mask.to(self.device), scales.to(self.device)
        packed = Packed.of(mask)
        if packed_features is not None:
            if features is not None or images is not None:
                raise ValueError('encode_bags takes one of images, features or packed_features')
            if self.scale_in_trunk:
                raise ValueError('scale.mode "trunk" reads the scale inside the trunk: it needs images, not cached '
                                 'features (train it with mode=e2e)')
            if packed_features.shape != (len(packed.bag), self.num_features):
                raise ValueError(f'packed_features {tuple(packed_features.shape)} do not match the {len(packed.bag)} '
                                 f'real instances of mask {tuple(mask.shape)} and trunk width {self.num_features}')
            h = packed_features.to(self.device)
        elif features is None:
            if images is None:
                raise ValueError('encode_bags needs images [B, K, C, H, W] or features [B, K, F]')
            # only real images go through the trunk: saves compute and keeps padding out of BatchNorm statistics
            h = self.encode_trunk(images[mask.to(images.device)], scales[mask])
        else:
            if self.scale_in_trunk:
                raise ValueError('scale.mode "trunk" reads the scale inside the trunk: it needs images, not cached '
                                 'features (train it with mode=e2e)')
            if features.shape[:2] != mask.shape or features.shape[-1] != self.num_features:
                raise ValueError(f'features {tuple(features.shape)} do not match mask {tuple(mask.shape)} '
                                 f'and trunk width {self.num_features}')
            h = features.to(self.device)[mask]  # padding, whatever a cache holds there (NaN too), is never read
        s = scales[mask]
        proj = _linear_of(self.image_proj)
        if not instances and proj is not None and isinstance(self.aggregator, MeanPool):
            pooled = proj(self.scale.pooled(h, s, packed.mean))
            return BagEmbeddings(F.normalize(pooled, dim=-1), None, packed.mean_weights(pooled.dtype))
        z = self._project(h, s, proj)
        pooled, attention = pool_packed(self.aggregator, z, packed, self.scale.attention_context(s))
        return BagEmbeddings(F.normalize(pooled, dim=-1), packed.pad(F.normalize(z, dim=-1)) if instances else None,
                             attention)

    def _project(self, h: torch.Tensor, s: torch.Tensor, proj: Optional[nn.Linear]) -> torch.Tensor:
        """Image embeddings z [N, E] = image_proj(scale(h, s)) of packed trunk features h [N, F] and nm/px s [N]."""
        embed = self.scale.embeds['feature'] if self.scale.mode == 'add' and 'feature' in self.scale.embeds else None
        if embed is not None and proj is not None and not h.requires_grad and len(h) >= FOLD_MIN_INSTANCES:
            # W(h + e(s)) + b = W·h + (W·e)(s) + b: the F-wide sum and its gradient (needed only by e) never exist
            return F.linear(h, proj.weight, proj.bias) + embed.through(s, proj.weight)
        return self.image_proj(self.scale(h, s))

    def tokenize(self, texts: Union[str, List[str]]) -> torch.Tensor:
        tokens = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        pad_id = self.text.trailing_pad_id
        if pad_id is not None:
            # HF tokenizers pad to context_length; trailing all-pad columns are masked out anyway, and dropping
            # them saves most of the text tower's compute on short reports
            used = (tokens != pad_id).any(dim=0).nonzero()
            tokens = tokens[:, :int(used.max()) + 1 if len(used) else 1]
        return tokens.to(self.device)

    def encode_text(self, texts: Union[str, List[str]]) -> torch.Tensor:
        """L2-normalised report embeddings [B, E]."""
        return F.normalize(self.text(self.tokenize(texts)), dim=-1)

    def encode_text_pooled(self, texts: Union[str, List[str]]) -> torch.Tensor:
        """Text encoder output [B, D] before the projection: what a cache of a frozen text encoder stores."""
        return self.text.pooled(self.tokenize(texts))

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """L2-normalised report embeddings [B, E] from ``encode_text_pooled`` output."""
        return F.normalize(self.text.project(pooled.to(self.device)), dim=-1)

    def clamp_logit_scale(self):
        """Keep the temperature in [1, 100] (t in [0, ln 100]); call after every optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def forward(self, batch: dict, instances: bool = True) -> Dict[str, torch.Tensor]:
        """Embeddings of a collated batch; cached pooled report features may come as ``batch["text_features"]``.
        ``instances=False`` leaves the image-level embeddings out (see ``encode_bags``): a training step's saving."""
        bags = self.encode_bags(batch['scales'], batch['mask'], images=batch.get('images'),
                                features=batch.get('features'), instances=instances,
                                packed_features=batch.get('packed_features'))
        if batch.get('text_features') is not None:
            report = self.project_text(batch['text_features'])
        else:
            report = self.encode_text(batch['reports'])
        out = dict(patient=bags.patient, report=report, attention=bags.attention, logit_scale=self.logit_scale.exp())
        if instances:
            out['instances'] = bags.instances
        if self.logit_bias is not None:
            out['logit_bias'] = self.logit_bias
        return out

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters per part: trunk, scale embedding (the scale input only), scale layers (the mode's layers both
        arms have), aggregator, projections (image + text), text tower."""
        def count(module):
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        text_proj = sum(p.numel() for n, p in self.text.named_parameters() if self.text.is_projection(n))
        counts = dict(
            trunk=count(self.trunk),
            scale_embed=count(self.scale_embed),
            scale_layers=count(self.scale.layers),
            aggregator=count(self.aggregator),
            projections=count(self.image_proj) + text_proj,
            text_tower=count(self.text) - text_proj,
            temperature=count(self) - count(self.trunk) - count(self.scale) - count(self.aggregator)
            - count(self.image_proj) - count(self.text),
        )
        counts['total'] = count(self)
        counts['trainable'] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


def _linear_of(module: nn.Module) -> Optional[nn.Linear]:
    """The nn.Linear of a plain linear projection (open_clip's timm head is Dropout(0) + Linear), else None."""
    if isinstance(module, nn.Linear):
        return module
    if not isinstance(module, nn.Sequential):
        return None
    layers = [m for m in module if not (isinstance(m, nn.Dropout) and m.p == 0)]
    return layers[0] if len(layers) == 1 and isinstance(layers[0], nn.Linear) else None


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def build_model(
        model: Union[str, dict] = DEFAULT_MODEL,
        scale_embed: Optional[bool] = None,
        scale_encoding: Optional[str] = None,
        scale_mode: Optional[str] = None,
        scale_attention: Optional[bool] = None,
        aggregator: Union[str, dict, None] = None,
        **overrides,
) -> EMClip:
    """Build an EMClip from a packaged config name, a JSON path, a dict, or an open_clip model name.

    ``scale_embed`` / ``scale_encoding`` / ``scale_mode`` / ``scale_attention`` / ``aggregator`` override the config's choices (None keeps them); other
    keyword overrides are merged into the config, e.g. ``embed_dim=128``, ``lock_image=False``,
    ``load_pretrained=False`` (architecture only), ``pretrained="laion2b_s34b_b79k"`` (open_clip tag or file),
    ``checkpoint="run/model.pt"`` (a saved emclip state dict, loaded strictly), ``loss="siglip"`` (temperature
    ln 10 and a learnable bias -10 for ``emclip.loss.SigLipLoss``), ``lock_text=True``, ``channels_last=True``.
    """
    cfg = load_model_config(model)
    if 'pretrained' in overrides:
        pretrained = overrides.pop('pretrained')
        if 'open_clip' in cfg:
            cfg['open_clip']['pretrained'] = pretrained
        else:
            cfg['load_pretrained'] = bool(pretrained)
    _merge(cfg, overrides)
    if scale_embed is not None:
        cfg.setdefault('scale', {})['enabled'] = bool(scale_embed)
    if scale_encoding is not None:
        cfg.setdefault('scale', {})['encoding'] = scale_encoding
    if scale_mode is not None:
        cfg.setdefault('scale', {})['mode'] = scale_mode
    if scale_attention is not None:
        cfg.setdefault('scale', {})['attention'] = bool(scale_attention)
    if isinstance(aggregator, str):
        cfg.setdefault('aggregator', {})['name'] = aggregator
    elif isinstance(aggregator, dict):
        _merge(cfg.setdefault('aggregator', {}), aggregator)
    net = EMClip(cfg)
    if cfg.get('checkpoint'):
        load_checkpoint(net, cfg['checkpoint'])
    return net
