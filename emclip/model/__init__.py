"""emclip model: open_clip towers, scale embedding, multiple-instance aggregators."""
from .aggregators import AGGREGATORS, GatedAttentionPool, MeanPool, TransformerPool, check_bags, create_aggregator
from .emclip import BagEmbeddings, EMClip, build_model
from .scale import SCALE_ENCODINGS, ScaleEmbed, create_scale_embed
from .towers import list_model_configs, load_model_config
from .weights import create_timm_classifier, list_offline_weights, resolve_weights

__all__ = [
    'AGGREGATORS', 'SCALE_ENCODINGS', 'BagEmbeddings', 'EMClip', 'GatedAttentionPool', 'MeanPool', 'ScaleEmbed',
    'TransformerPool', 'build_model', 'check_bags', 'create_aggregator', 'create_scale_embed',
    'create_timm_classifier', 'list_model_configs', 'list_offline_weights', 'load_model_config', 'resolve_weights',
]
