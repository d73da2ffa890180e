"""Pooled features of a frozen text tower, computed once per report and kept on disk.

With ``lock_text`` only the text projection trains, so the transformer's pooled output of each report never
changes: computing it once removes the text transformer from every training step, and the file
``<cache_dir>/text-<key>.npy`` lets every run (and every evaluation) with the same text tower and reports reuse it.
The key hashes the frozen text weights (the trainable projection excluded) and the report texts.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def _frozen_text_digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.text.state_dict().items()):
        if model.text.is_projection(name):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class TextFeatures:
    index: dict[str, int]          # patient_id -> row
    features: torch.Tensor         # (P, D) pooled, unprojected
    by_text: dict[str, int]        # report text -> row

    @classmethod
    @torch.no_grad()
    def build(cls, model, cohort, batch_size: int = 64, cache_dir: str | Path | None = None) -> "TextFeatures":
        ids = list(cohort.reports.patient_id)
        texts = list(cohort.reports.report)
        path = None
        if cache_dir is not None:
            key = hashlib.sha256((_frozen_text_digest(model) + "\0".join(texts)).encode()).hexdigest()[:20]
            path = Path(cache_dir) / f"text-{key}.npy"
        if path is not None and path.is_file():
            features = torch.from_numpy(np.load(path))
        else:
            was_training = model.training
            model.eval()
            chunks = [model.encode_text_pooled(texts[i:i + batch_size]).float().cpu()
                      for i in range(0, len(texts), batch_size)]
            model.train(was_training)
            features = torch.cat(chunks)
            if path is not None:   # written atomically: a concurrent or killed writer never leaves half a file
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as fh:
                    np.save(fh, features.numpy())
                os.replace(fh.name, path)
        return cls({pid: i for i, pid in enumerate(ids)}, features, {t: i for i, t in enumerate(texts)})

    def lookup(self, patient_ids: list[str]) -> torch.Tensor:
        return self.features[[self.index[p] for p in patient_ids]]

    def lookup_texts(self, texts: list[str]) -> torch.Tensor:
        return self.features[[self.by_text[t] for t in texts]]


class CachedTextModel:
    """A model whose ``encode_text`` reads cached pooled features of known reports (unknown texts, e.g. zero-shot
    prompts, go through the text tower); everything else is the wrapped model."""

    def __init__(self, model, text: TextFeatures):
        self._model, self._text = model, text

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_text(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if all(t in self._text.by_text for t in texts):
            return self._model.project_text(self._text.lookup_texts(texts))
        return self._model.encode_text(texts)
