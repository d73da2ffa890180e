"""Frozen embeddings of a cohort: one container, one .npz file, one function that fills it from a model.

Every later evaluation step (zero-shot, retrieval, linear probe, figures) reads only this container, so a model is
run once per checkpoint and the metrics can be recomputed or compared without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

__all__ = ['Embeddings', 'embed_cohort', 'scale_from_logit']


def scale_from_logit(logit_scale) -> float:
    """Multiplicative logit scale s. A tensor is the model's parameter (log s, open_clip convention); a number is s."""
    if isinstance(logit_scale, torch.Tensor):
        return float(logit_scale.detach().float().exp().item())
    return float(logit_scale)


def _str_array(values) -> np.ndarray:
    # fixed-width unicode arrays keep the .npz free of pickled objects
    return np.asarray(['' if v is None or (isinstance(v, float) and v != v) else str(v) for v in values],
                      dtype=np.str_)  # None and NaN (pandas' missing value) are both "no value"


@dataclass(eq=False)  # field-wise == on arrays would be ambiguous
class Embeddings:
    """Patient, report and image embeddings of a cohort plus the metadata evaluation needs.

    Patient-level arrays have one row per patient; image-level arrays one row per real (unpadded) image, with
    ``image_patient`` giving the row of its patient. Missing ``split`` / ``diagnosis`` values are empty strings.
    ``image_attention`` is the aggregator's weight of the image within its bag (NaN when the aggregator has none).
    """
    patient_ids: np.ndarray
    split: np.ndarray
    diagnosis: np.ndarray
    patient: np.ndarray
    report: np.ndarray
    image: np.ndarray
    image_patient: np.ndarray
    image_paths: np.ndarray
    image_scales: np.ndarray
    image_attention: np.ndarray
    logit_scale: float = float('nan')  # multiplicative s = exp(t); NaN when unknown
    meta: dict = field(default_factory=dict)
    # where each diagnosis came from: 'given', 'labeler' or 'none' (emclip.data.diagnoses); None: given if present
    diagnosis_source: np.ndarray | None = None

    def __post_init__(self):
        if self.diagnosis_source is None:
            self.diagnosis_source = ['given' if d not in (None, '') else 'none' for d in self.diagnosis]
        for name in ('patient_ids', 'split', 'diagnosis', 'image_paths', 'diagnosis_source'):
            setattr(self, name, _str_array(getattr(self, name)))
        for name in ('patient', 'report', 'image', 'image_scales', 'image_attention'):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        self.image_patient = np.asarray(self.image_patient, dtype=np.int64)
        n_p, n_i = len(self.patient_ids), len(self.image_patient)
        for name in ('split', 'diagnosis', 'diagnosis_source', 'patient', 'report'):
            if len(getattr(self, name)) != n_p:
                raise ValueError(f'Embeddings.{name} has {len(getattr(self, name))} rows, expected {n_p} patients')
        for name in ('image', 'image_paths', 'image_scales', 'image_attention'):
            if len(getattr(self, name)) != n_i:
                raise ValueError(f'Embeddings.{name} has {len(getattr(self, name))} rows, expected {n_i} images')
        if n_i and (self.image_patient.min() < 0 or self.image_patient.max() >= n_p):
            raise ValueError('Embeddings.image_patient points outside the patient rows')
        if len(set(self.patient_ids.tolist())) != n_p:
            raise ValueError('Embeddings.patient_ids are not unique')

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def n_images(self) -> int:
        return len(self.image_patient)

    def subset(self, split: str | None) -> 'Embeddings':
        """Patients of one split (all patients for None), image rows re-indexed."""
        return self if split is None else self.take(self.split == split)

    def take(self, keep: np.ndarray) -> 'Embeddings':
        """The patients where the boolean mask ``keep`` is True, with their images (image rows re-indexed)."""
        keep = np.asarray(keep, dtype=bool)
        new_index = np.full(self.n_patients, -1, dtype=np.int64)
        new_index[keep] = np.arange(int(keep.sum()))
        rows = keep[self.image_patient]
        return Embeddings(
            self.patient_ids[keep], self.split[keep], self.diagnosis[keep], self.patient[keep], self.report[keep],
            self.image[rows], new_index[self.image_patient[rows]], self.image_paths[rows], self.image_scales[rows],
            self.image_attention[rows], self.logit_scale, dict(self.meta), self.diagnosis_source[keep])

    @classmethod
    def concat(cls, parts: list['Embeddings']) -> 'Embeddings':
        """The patients of ``parts`` in order (e.g. the shards of a sharded embedding), image rows re-indexed;
        logit scale and meta from the first part."""
        if not parts:
            raise ValueError('Embeddings.concat needs at least one part')
        offsets = np.cumsum([0] + [p.n_patients for p in parts[:-1]])
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(
            cat('patient_ids'), cat('split'), cat('diagnosis'), cat('patient'), cat('report'), cat('image'),
            np.concatenate([p.image_patient + o for p, o in zip(parts, offsets)]), cat('image_paths'),
            cat('image_scales'), cat('image_attention'), parts[0].logit_scale, dict(parts[0].meta),
            cat('diagnosis_source'))

    def save(self, path: str | Path) -> Path:
        """Write everything to one .npz (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ('logit_scale', 'meta')}
        arrays['logit_scale'] = np.float64(self.logit_scale)
        arrays['meta_json'] = np.asarray(json.dumps(self.meta))
        with open(path, 'wb') as fh:  # a file handle stops numpy appending a second '.npz'
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> 'Embeddings':
        with np.load(path, allow_pickle=False) as z:  # files written before diagnosis_source existed still load
            kwargs = {f.name: z[f.name] for f in fields(cls) if f.name not in ('logit_scale', 'meta') and f.name in z}
            return cls(**kwargs, logit_scale=float(z['logit_scale']), meta=json.loads(str(z['meta_json'])))


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def default_device() -> torch.device:
    """Where evaluation runs when nobody says: the accelerator when one is present (CUDA, then Apple MPS), else CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda')
    mps = getattr(torch.backends, 'mps', None)
    return torch.device('mps') if mps is not None and mps.is_available() else torch.device('cpu')


@torch.no_grad()
def embed_cohort(model, loader, device: str | torch.device | None = None, split: str | dict | None = None,
                 meta: dict | None = None, reports: bool = True) -> Embeddings:
    """Run ``model`` in eval mode without gradients over ``loader`` and collect an :class:`Embeddings`.

    Batches follow the data contract: ``images`` [B,K,C,H,W] or ``features`` [B,K,F], ``scales`` [B,K], ``mask`` [B,K]
    (True = real image), ``reports``, ``patient_ids``, ``diagnoses``, ``image_paths`` (real images only, in bag
    order). The split of each patient comes from a ``split`` list in the batch when present, else from ``split``
    (one name for the whole loader, or a patient id -> split mapping). Batches go to ``device``, by default the
    model's own. The model's train/eval mode is restored. ``reports=False`` leaves the text tower out (a cohort
    without reports): report embeddings are NaN.
    """
    device = next(model.parameters()).device if device is None else torch.device(device)   # default: the model's
    was_training = model.training
    model.eval()
    cols = {k: [] for k in ('pid', 'split', 'dx', 'src', 'patient', 'report', 'image', 'owner', 'path', 'scale',
                            'attn')}
    n_seen = 0
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            mask = batch['mask'].bool()
            bags = model.encode_bags(batch['scales'], mask, images=batch.get('images'), features=batch.get('features'))
            texts = model.encode_text(list(batch['reports'])) if reports else \
                torch.full_like(bags.patient, float('nan'))
            pids = list(batch['patient_ids'])
            for b, pid in enumerate(pids):
                real = mask[b]
                paths = list(batch['image_paths'][b]) if batch.get('image_paths') is not None else []
                if len(paths) == len(real) != int(real.sum()):  # paths given per slot, padding included
                    paths = [q for q, keep in zip(paths, real.tolist()) if keep]
                if paths and len(paths) != int(real.sum()):
                    raise ValueError(f'patient {pid}: {len(paths)} image paths but {int(real.sum())} real images')
                cols['path'].extend(paths or [''] * int(real.sum()))
                cols['owner'].extend([n_seen + b] * int(real.sum()))
            attention = getattr(bags, 'attention', None)
            if attention is None:
                attention = torch.full(mask.shape, float('nan'), device=mask.device)
            cols['pid'].extend(pids)
            dx = batch.get('diagnoses') or [None] * len(pids)
            cols['dx'].extend(dx)
            cols['src'].extend(batch.get('diagnosis_sources') or ['given' if d else 'none' for d in dx])
            if batch.get('split') is not None:
                cols['split'].extend(batch['split'])
            elif isinstance(split, dict):
                cols['split'].extend(split.get(p) for p in pids)
            else:
                cols['split'].extend([split] * len(pids))
            cols['patient'].append(bags.patient.float().cpu())
            cols['report'].append(texts.float().cpu())
            cols['image'].append(bags.instances[mask].float().cpu())
            cols['scale'].append(batch['scales'][mask].float().cpu())
            cols['attn'].append(attention[mask].float().cpu())
            n_seen += len(pids)
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise ValueError('embed_cohort: the loader yielded no batches')
    meta = dict(meta or {})
    logit_scale = getattr(model, 'logit_scale', None)
    return Embeddings(
        patient_ids=cols['pid'], split=cols['split'], diagnosis=cols['dx'],
        patient=torch.cat(cols['patient']).numpy(), report=torch.cat(cols['report']).numpy(),
        image=torch.cat(cols['image']).numpy(), image_patient=np.asarray(cols['owner'], dtype=np.int64),
        image_paths=cols['path'], image_scales=torch.cat(cols['scale']).numpy(),
        image_attention=torch.cat(cols['attn']).numpy(),
        logit_scale=scale_from_logit(logit_scale) if logit_scale is not None else float('nan'), meta=meta,
        diagnosis_source=cols['src'])
