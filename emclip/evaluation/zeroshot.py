"""Zero-shot diagnosis: class prompts as data, prompt-ensembled class embeddings, patient- and image-level scoring.

Patient level: probabilities = softmax(s * cos(patient, class)). Image level (MI-Zero / CONCH slide-level baseline):
every image is scored against every class, each patient's class score is the mean of its top-j image scores, and
the softmax is taken over those pooled scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.special
import torch
import yaml

__all__ = [
    'PromptSet', 'GENERIC_TEMPLATES', 'load_prompts', 'prompts_from_diagnoses', 'resolve_prompts',
    'class_embeddings', 'text_embeddings', 'ensemble', 'zero_shot_logits', 'softmax', 'topj_pool',
]

# EM-generic (not renal-specific) templates used when classes come from a cohort's diagnosis values
GENERIC_TEMPLATES = (
    '{}',
    'electron micrograph of {}',
    'an electron microscopy image showing {}',
    'ultrastructural findings consistent with {}',
)


@dataclass
class PromptSet:
    """Ordered class names, the phrases embedded for each (``synonyms``) and the ``templates`` they fill."""
    classes: list[str]
    synonyms: dict[str, list[str]]
    templates: list[str]

    def __post_init__(self):
        if not self.classes:
            raise ValueError('PromptSet needs at least one class')
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f'duplicate class names in {self.classes}')
        for t in self.templates:
            if t.count('{}') != 1:
                raise ValueError(f'template {t!r} must contain exactly one "{{}}"')
        self.synonyms = {c: list(self.synonyms.get(c) or [c]) for c in self.classes}

    def texts(self, name: str) -> list[str]:
        """All (synonym x template) prompts of one class."""
        return [t.format(s) for s in self.synonyms[name] for t in self.templates]


def load_prompts(source: str | Path = 'renal_em') -> PromptSet:
    """Load a class/prompt YAML file: a path, or the name of a file bundled in ``emclip/configs/prompts``."""
    path = Path(source)
    if not path.suffix:
        path = Path(str(resources.files('emclip') / 'configs' / 'prompts' / f'{source}.yaml'))
    if not path.is_file():
        raise FileNotFoundError(f'prompt file not found: {path}')
    spec = yaml.safe_load(path.read_text()) or {}
    try:
        entries = spec['classes']
    except (KeyError, TypeError):
        raise ValueError(f'{path}: expected a top-level "classes" list') from None
    classes, synonyms = [], {}
    for i, entry in enumerate(entries):
        entry = {'name': entry} if isinstance(entry, str) else entry
        if 'name' not in entry:
            raise ValueError(f'{path}: class entry {i} has no "name"')
        classes.append(str(entry['name']))
        synonyms[str(entry['name'])] = [str(s) for s in entry.get('synonyms') or []]
    return PromptSet(classes, synonyms, [str(t) for t in spec.get('templates') or GENERIC_TEMPLATES])


def prompts_from_diagnoses(diagnoses: Iterable[str | None], known: PromptSet | None = None,
                           templates: Sequence[str] = GENERIC_TEMPLATES) -> PromptSet:
    """Classes = sorted distinct non-empty cohort diagnoses; synonyms = the name itself and generic templates.

    When ``known`` is given, a class it also defines (exact name) keeps its curated synonyms.
    """
    classes = sorted({str(d) for d in diagnoses if d is not None and str(d) != ''})
    if not classes:
        raise ValueError('no diagnosis values to build zero-shot classes from')
    synonyms = {c: (known.synonyms[c] if known is not None and c in known.synonyms else [c]) for c in classes}
    return PromptSet(classes, synonyms, list(templates))


def resolve_prompts(classes, diagnoses: Iterable[str | None]) -> PromptSet:
    """A PromptSet from ``classes``: a PromptSet, a YAML path or bundled name, a list of names, or None (cohort)."""
    if isinstance(classes, PromptSet):
        return classes
    if classes is None:
        return prompts_from_diagnoses(diagnoses)
    if isinstance(classes, (str, Path)):
        return load_prompts(classes)
    return PromptSet([str(c) for c in classes], {}, list(GENERIC_TEMPLATES))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def text_embeddings(encode_text: Callable[[list[str]], torch.Tensor], prompts: PromptSet,
                    batch_size: int = 256) -> list[np.ndarray]:
    """Normalised embedding of every (synonym x template) text: one [n_texts, D] array per class, in class order."""
    texts = [prompts.texts(c) for c in prompts.classes]
    flat = [t for group in texts for t in group]
    parts = [torch.as_tensor(encode_text(flat[i:i + batch_size])).float().cpu() for i in range(0, len(flat),
                                                                                                  batch_size)]
    emb = _normalize(torch.cat(parts)).numpy()  # re-normalise: encoders may be called outside their wrapper
    bounds = np.cumsum([0] + [len(g) for g in texts])
    return [emb[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def ensemble(per_class: list[np.ndarray]) -> np.ndarray:
    """Class embeddings from text embeddings: the re-normalised mean of each class's texts."""
    return _normalize(torch.from_numpy(np.stack([t.mean(0) for t in per_class]))).numpy()


def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], prompts: PromptSet,
                     batch_size: int = 256) -> np.ndarray:
    """Re-normalised mean of the normalised embeddings of every (synonym x template) text, one row per class."""
    return ensemble(text_embeddings(encode_text, prompts, batch_size))


def zero_shot_logits(embeddings: np.ndarray, class_emb: np.ndarray, scale: float, chunk: int = 65536) -> np.ndarray:
    """s * cosine similarity between each embedding row and each class embedding (rows in chunks: no full copy)."""
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    c = _normalize(torch.from_numpy(np.ascontiguousarray(class_emb, dtype=np.float32)))
    out = torch.empty(len(x), len(c))
    for a in range(0, len(x), chunk):
        out[a:a + chunk] = scale * (_normalize(x[a:a + chunk]) @ c.T)
    return out.numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the classes (axis 1) of [N, C] logits."""
    return scipy.special.softmax(logits, axis=1)


def topj_pool(image_scores: np.ndarray, image_patient: np.ndarray, n_patients: int, j: int) -> np.ndarray:
    """Per patient and class, the mean of the patient's j highest image scores (all of them if it has fewer).

    Patients without images get NaN rows.
    """
    if j < 1:
        raise ValueError(f'top-j pooling needs j >= 1, got {j}')
    scores = np.asarray(image_scores, dtype=np.float64)
    owner = np.asarray(image_patient, dtype=np.int64)
    counts = np.bincount(owner, minlength=n_patients)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # start of each patient's block after sorting
    out = np.full((n_patients, scores.shape[1]), np.nan)
    for c in range(scores.shape[1]):
        order = np.lexsort((-scores[:, c], owner))  # by patient, then by descending score
        within = np.arange(len(order)) - first[owner[order]]
        keep = order[within < j]
        total = np.bincount(owner[keep], weights=scores[keep, c], minlength=n_patients)
        n = np.bincount(owner[keep], minlength=n_patients)
        with np.errstate(invalid='ignore', divide='ignore'):
            out[:, c] = total / n
    return out
