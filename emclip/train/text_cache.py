"""Pooled features of a frozen text tower, computed once per report and kept on disk.

With ``lock_text`` only the text projection trains, so the transformer's pooled output of each report never
changes: computing it once removes the text transformer from every training step, and the file
``<cache_dir>/text-<key>.npz`` lets every run (and every evaluation) with the same text tower and reports reuse it.
The key hashes the frozen text weights (the trainable projection excluded), the patient ids and the report texts.

The file (written atomically: temp + rename) holds the features, the key and the patient ids it was built for. A
file that cannot be read (truncated, empty, not an ``.npz``), lacks an entry, carries another key or other patients,
or holds an array of the wrong shape, type or with non-finite values is reported as damaged and rebuilt, never used.

With several processes (``accelerator``) the main process alone reads or builds the features and sends them to the
others: the text tower runs once per run, not once per process, and no shared filesystem is needed.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..digests import tensors_digest
from ..paths import write_bytes_atomic
from .collective import main_first

TEXT_CACHE_VERSION = 2   # 2: .npz with key and patient ids (1: a bare .npy of the features)


def _frozen_text_digest(model) -> str:
    """Digest of the text tower without its projection; remembered until one of those tensors is replaced or
    written in place (storage address and version counter), since hashing ~90 MB costs a quarter second."""
    items = [(name, tensor) for name, tensor in sorted(model.text.state_dict().items())
             if not model.text.is_projection(name)]
    stamp = tuple((name, t.data_ptr(), t._version, tuple(t.shape)) for name, t in items)
    memo = getattr(model.text, "_emclip_text_digest", None)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    digest = tensors_digest(items)
    object.__setattr__(model.text, "_emclip_text_digest", (stamp, digest))
    return digest


def text_cache_key(model, ids: list[str], texts: list[str]) -> str:
    payload = json.dumps({"version": TEXT_CACHE_VERSION, "text": _frozen_text_digest(model), "ids": ids,
                          "texts": texts})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def read_text_cache(path: Path, key: str, ids: list[str], dim: int) -> tuple[torch.Tensor | None, str]:
    """(features, "ok") when ``path`` is a complete cache for ``key`` and ``ids`` with ``dim`` features per
    patient; else (None, why it cannot be used)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = sorted({"key", "patient_ids", "features"} - set(data.files))
            if missing:
                return None, f"no {', '.join(missing)} entry"
            stored_key, stored_ids, features = str(data["key"]), data["patient_ids"], data["features"]
    except Exception as err:   # truncated, empty, garbage, not an .npz: whatever numpy or zipfile raise
        return None, f"unreadable: {type(err).__name__}: {err}"
    if stored_key != key:
        return None, f"key {stored_key[:20]!r} is not this cache's {key!r}"
    if stored_ids.shape != (len(ids),) or stored_ids.tolist() != ids:
        return None, f"built for other patients ({stored_ids.size} ids, this cohort has {len(ids)})"
    if features.dtype != np.float32 or features.shape != (len(ids), dim):
        return None, (f"features are {features.dtype} of shape {features.shape}, expected float32 of shape "
                      f"{(len(ids), dim)}")
    if not np.isfinite(features).all():
        return None, "features hold non-finite values"
    return torch.from_numpy(features), "ok"


def write_text_cache(path: Path, key: str, ids: list[str], features: torch.Tensor) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), patient_ids=np.array(ids, dtype=str),
             features=features.numpy().astype(np.float32, copy=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())   # a concurrent or killed writer never leaves half a file


def _encode(model, texts: list[str], batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        chunks = [model.encode_text_pooled(texts[i:i + batch_size]).float().cpu()
                  for i in range(0, len(texts), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def _read_or_encode(model, names: list[str], texts: list[str], batch_size: int, cache_dir, log,
                    prefix: str = "text") -> torch.Tensor:
    """The cached features of these texts when whole, else encoded (and cached in ``<cache_dir>/<prefix>-<key>.npz``
    when ``cache_dir`` is given)."""
    features, path = None, None
    if cache_dir is not None:
        key = text_cache_key(model, names, texts)
        path = Path(cache_dir) / f"{prefix}-{key}.npz"
        if path.exists():
            dim = int(_encode(model, texts[:1], 1).shape[-1])   # one text: the tower's feature size
            features, reason = read_text_cache(path, key, names, dim)
            if features is None:
                log(f"text cache {path} is damaged ({reason}); rebuilding")
    if features is None:
        features = _encode(model, texts, batch_size)
        if path is not None:
            try:
                if path.is_dir():   # nothing but this cache may live under its name
                    shutil.rmtree(path)
                write_text_cache(path, key, names, features)
            except OSError as err:   # e.g. a read-only cache folder: the features are still correct
                log(f"text cache {path} could not be written ({err}); continuing without it")
    return features


@dataclass
class TextFeatures:
    index: dict[str, int]          # patient_id -> row
    features: torch.Tensor         # (P, D) pooled, unprojected
    by_text: dict[str, int]        # report text -> row

    @classmethod
    @torch.no_grad()
    def build(cls, model, cohort, batch_size: int = 64, cache_dir: str | Path | None = None,
              log=print, accelerator=None) -> "TextFeatures":
        ids = list(cohort.reports.patient_id)
        texts = list(cohort.reports.report)
        features = main_first(accelerator, lambda: _read_or_encode(model, [str(p) for p in ids], texts, batch_size,
                                                                   cache_dir, log), "could not build text features")
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


def cached_text_encoder(model, cache_dir: str | Path, batch_size: int = 64, log=print):
    """``model.encode_text`` for texts that recur from run to run, such as the zero-shot prompts: with a frozen text
    tower, each call's pooled features are kept in ``<cache_dir>/prompts-<key>.npz`` (keyed like the report cache:
    frozen text weights and the texts), and only the trainable projection runs. Every arm of an ablation scores the
    same prompts, which took the text transformer ~3 s per evaluation."""
    def encode(texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        features = _read_or_encode(model, texts, texts, batch_size, cache_dir, log, prefix="prompts")
        return model.project_text(features)
    return encode
