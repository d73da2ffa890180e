"""Evaluation protocol: zero-shot diagnosis, retrieval, linear probe, bootstrap CIs, metrics.json and figures.

Typical use::

    emb = embed_cohort(model, test_loader, split='test')      # or Embeddings.load('embeddings.npz')
    metrics = evaluate(emb, model.encode_text, model.logit_scale, 'reports/run1', classes='renal_em')
"""
from .embeddings import Embeddings, embed_cohort, scale_from_logit
from .probe import DEFAULT_CS, linear_probe
from .report import SCHEMA_VERSION, compare_runs, evaluate, to_json_safe
from .retrieval import (
    RetrievalResult, image_image_retrieval, patient_report_retrieval, report_image_retrieval, summarize_retrieval)
from .zeroshot import (
    GENERIC_TEMPLATES, PromptSet, class_embeddings, load_prompts, prompts_from_diagnoses, resolve_prompts, softmax,
    topj_pool, zero_shot_logits)

__all__ = [
    'Embeddings', 'embed_cohort', 'scale_from_logit', 'evaluate', 'compare_runs', 'SCHEMA_VERSION', 'to_json_safe',
    'linear_probe', 'DEFAULT_CS', 'RetrievalResult', 'patient_report_retrieval', 'report_image_retrieval',
    'image_image_retrieval', 'summarize_retrieval', 'PromptSet', 'GENERIC_TEMPLATES', 'load_prompts',
    'prompts_from_diagnoses', 'resolve_prompts', 'class_embeddings', 'zero_shot_logits', 'softmax', 'topj_pool',
]
