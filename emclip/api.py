"""The public face of emclip: build a model, load a trained one, and apply it to new patients (open_clip's ways).

    >>> import emclip
    >>> model, transform, tokenizer = emclip.create_model_and_transforms("tiny")   # a config name, a JSON, a folder
    >>> trained = emclip.load("runs/demo/mlp-mean-aware-s0")    # a run folder, or a folder `emclip.export` wrote
    >>> table = trained.predict("my_cohort")                    # zero-shot diagnosis, one row per patient
    >>> emb = trained.embed("my_cohort")                        # patient and image embeddings, attention weights
    >>> hits = trained.search("my_index", text="fibrils of 10 nm")   # an index `python -m emclip.embed` wrote

A cohort to apply a model to needs only ``images.csv`` (``patient_id``, ``path``, ``nm_per_pixel``); reports,
diagnoses and splits are used when present. Every image goes through the same steps as in training and evaluation
(``load_transformed`` -> trunk -> effective nm/px = nm/px x zoom -> scale conditioning -> aggregator), so nothing
has to be re-assembled by hand, and the zero-shot scores are computed by the evaluation's own functions.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import BagDataset, Cohort, ImageTransform, collate_bags, load_cohort
from .data.diagnoses import LabelOptions
from .digests import tensors_digest
from .evaluation.embeddings import Embeddings, default_device, embed_cohort, scale_from_logit
from .evaluation.priors import mean_logprob_correction
from .evaluation.zeroshot import PromptSet, ensemble, resolve_prompts, softmax, text_embeddings, zero_shot_logits
from .model import EMClip, build_model
from .model.towers import DEFAULT_MODEL, build_tokenizer, load_model_config
from .paths import resolve
from .progress import bars_disabled

__all__ = ["create_model_and_transforms", "get_tokenizer", "load", "search_index", "TrainedModel", "ScaleRangeWarning",
           "CHUNK_IMAGES"]

CHUNK_IMAGES = 8192   # images whose trunk features are held at once while a cohort is embedded (~40 MB at F=1280)


class ScaleRangeWarning(UserWarning):
    """Images reach the model at physical scales it never saw in training: their embeddings extrapolate."""


def _is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def _model_config(name: str | Path) -> dict:
    """The model config behind a name: a packaged config, a JSON, an exported model folder or a run folder."""
    path = Path(name)
    if path.is_dir():
        from .serving.modelfolder import is_model_folder
        if is_model_folder(path):
            return json.loads((path / "config.json").read_text())["model_config"]
        if _is_run(path):
            from .train.config import TrainConfig
            cfg = TrainConfig(**json.loads((path / "config.json").read_text()))
            return load_model_config(cfg.model)
        raise FileNotFoundError(f"{path} is neither an exported model folder (config.json of an emclip model) nor a "
                                f"run folder (config.json + checkpoints/)")
    return load_model_config(str(name))


def get_tokenizer(model_name: str | Path = DEFAULT_MODEL):
    """The text tokenizer of a model (a packaged config name, a JSON path, an open_clip name, an exported model
    folder or a run folder), without building the model: ``tokenizer(["a report"])`` -> token ids [1, L].

    >>> emclip.get_tokenizer("tiny")(["thin glomerular basement membranes"]).shape
    torch.Size([1, 32])
    """
    return build_tokenizer(_model_config(model_name))


def create_model_and_transforms(model_name: str | Path = DEFAULT_MODEL, device: str | torch.device | None = None,
                                **overrides) -> tuple[EMClip, ImageTransform, object]:
    """``(model, image_transform, tokenizer)``, as open_clip's function of the same name.

    ``model_name`` is a packaged config (``emclip.model.list_model_configs()``), a JSON path or an open_clip model
    name (a fresh model; ``overrides`` as for :func:`emclip.model.build_model`), or a trained model: a run folder or
    an exported model folder (loaded with its weights, in eval mode). ``image_transform(read_image(path))`` returns
    the tensor and the *zoom*: the model must be given ``nm_per_pixel * zoom``, the scale of the pixels it sees.

    >>> model, transform, tokenizer = emclip.create_model_and_transforms("tiny")
    >>> transform.image_size
    32
    """
    path = Path(model_name)
    if path.is_dir():
        if overrides:
            raise ValueError(f"a trained model is loaded as it was trained: overrides {sorted(overrides)} apply only "
                             f"to a new model built from a config")
        model = load(path, device=device).model
    else:
        model = build_model(str(model_name), **overrides)
        model = model.to(device) if device is not None else model
    return model, ImageTransform.from_preprocess(model.preprocess), model.tokenizer


def load(path: str | Path, checkpoint: str = "best", device: str | torch.device | None = None) -> "TrainedModel":
    """A trained model from a run folder (its verified ``checkpoint``: ``best``, ``latest`` or a step folder) or
    from an exported model folder (every file checked against its SHA-256), ready to embed, predict and search.
    Nothing is downloaded.

    >>> trained = emclip.load("runs/demo/mlp-mean-aware-s0")
    >>> trained.prompts.classes[:2]
    ['normal', 'thin basement membrane nephropathy']
    """
    source = resolve(path)
    device = torch.device(device) if device is not None else default_device()
    from .serving.modelfolder import is_model_folder, read_model_folder
    if is_model_folder(source):
        model, info = read_model_folder(source, device=device)
        scale_range = info.get("scale_range_nm")
        train_config = info.get("train_config") or {}
        labels = LabelOptions(train_config.get("label_vocab", "renal"), None,
                              train_config.get("label_uncertain", "exclude"))
        return TrainedModel(model, info["prompts"], tuple(scale_range) if scale_range else None, source, "folder",
                            labels=labels, info=info)
    if not source.exists():
        raise FileNotFoundError(f"model not found: {source}")
    if not _is_run(source):
        raise FileNotFoundError(f"{source} is neither an exported model folder (config.json of an emclip model) nor "
                                f"a run folder (config.json + checkpoints/)")
    from .evaluation.runs import load_run_model, prompt_classes
    from .train.runinfo import load_run_cohort
    model, cfg = load_run_model(source, checkpoint, device=device)
    cohort = load_run_cohort(cfg)
    prompts = resolve_prompts(prompt_classes(cohort), cohort.reports.diagnosis)
    return TrainedModel(model, prompts, training_scale_range(source, cohort, model), source, "run", config=cfg,
                        labels=cfg.label_options(), info={"checkpoint": checkpoint})


def training_scale_range(run: Path, cohort: Cohort, model: EMClip) -> tuple[float, float] | None:
    """The effective nm/px (given x zoom) of the run's train-split images: what the scale embedding was fitted on.
    Read from the run's evaluated ``embeddings.npz`` when there is one, else from the image headers."""
    path = Path(run) / "embeddings.npz"
    if path.is_file():   # three arrays of the .npz are read, not its embeddings
        with np.load(path, allow_pickle=False) as stored:
            scales = stored["image_scales"][(stored["split"] == "train")[stored["image_patient"]]]
    else:
        from .data.images import probe_image
        transform = ImageTransform.from_preprocess(model.preprocess)
        train = cohort.images[cohort.images.patient_id.isin(cohort.patient_ids("train"))]
        zoom = [transform._layout(*probe_image(p)[:2])[0] for p in train.path]
        scales = train.nm_per_pixel.to_numpy(np.float64) * np.asarray(zoom)
    scales = scales[np.isfinite(scales)]
    return (float(scales.min()), float(scales.max())) if len(scales) else None


class TrainedModel:
    """A trained emclip model with what applying it needs: its class prompts (``prompts``), the effective scale
    range its training images covered (``scale_range_nm``) and where it came from (``source``, ``kind`` = ``run``
    or ``folder``). Build it with :func:`load`."""

    def __init__(self, model: EMClip, prompts: PromptSet, scale_range_nm: tuple[float, float] | None, source: Path,
                 kind: str, config=None, labels: LabelOptions | None = None, info: dict | None = None):
        self.model, self.prompts, self.scale_range_nm = model.eval(), prompts, scale_range_nm
        self.source, self.kind, self.config, self.info = Path(source), kind, config, dict(info or {})
        self.labels = labels if labels is not None else LabelOptions(None)
        self._identity = None

    def __repr__(self) -> str:
        lo_hi = "unknown" if self.scale_range_nm is None else "{:.3g}-{:.3g} nm/px".format(*self.scale_range_nm)
        return (f"TrainedModel({self.kind} {self.source.name!r}, {len(self.prompts.classes)} classes, "
                f"embed_dim {self.model.embed_dim}, trained on {lo_hi})")

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform.from_preprocess(self.model.preprocess)

    @property
    def identity(self) -> str:
        """Digest of every weight: equal for a run and the folder exported from it, different for any other model
        (an embedding index records it, so a query is never scored in another model's space)."""
        if self._identity is None:
            self._identity = tensors_digest(sorted(self.model.state_dict().items()))[:16]
        return self._identity

    # ------------------------------------------------------------------------------------------------- cohorts

    def load_cohort(self, cohort: str | Path | Cohort, check_images: str = "exists") -> Cohort:
        """A cohort to apply the model to: ``images.csv`` alone is enough (see the data contract); a missing
        diagnosis is derived from a report as the model's training run did. Nothing is written into the folder."""
        if isinstance(cohort, Cohort):
            return cohort
        return load_cohort(resolve(cohort), check_images=check_images, require_splits=False, reports_required=False,
                           labels=self.labels)

    def _cached_features(self, cohort: Cohort):
        """The run's frozen-trunk feature cache for this cohort when one exists and is intact (never built here)."""
        if self.kind != "run" or self.config.mode != "cache" or self.model.scale_in_trunk:
            return None
        from .train.cache import check_cache, feature_cache_key, open_cache
        key = feature_cache_key(self.model, cohort)
        folder = self.config.cache_path / key
        usable, _ = check_cache(folder, key, len(cohort.images)) if folder.is_dir() else (False, "")
        return open_cache(folder) if usable else None

    def iter_embeddings(self, cohort: str | Path | Cohort, batch_size: int = 32,
                        chunk_images: int = CHUNK_IMAGES, progress: bool = True) -> Iterator[Embeddings]:
        """Embeddings of the cohort's patients a chunk at a time (about ``chunk_images`` images each, patients in
        table order), so that a cohort of any size is embedded in bounded memory. Trunk features come from the
        run's feature cache when it matches the cohort, else from the images (loaded in threads, as the cache
        build does)."""
        from .train.cache import trunk_features
        cohort = self.load_cohort(cohort)
        texts = bool((cohort.reports.report.astype(str).str.len() > 0).any())
        splits = dict(zip(cohort.reports.patient_id, cohort.reports.split))
        meta = {"model": str(self.source), "model_identity": self.identity, "cohort": str(cohort.root)}
        cache = self._cached_features(cohort)
        patients = cohort.patient_ids()
        sizes = cohort.images.groupby("patient_id", sort=False).size().reindex(patients).to_numpy()
        bar = tqdm(total=int(sizes.sum()), desc="embedding images", unit="img", disable=not progress or bars_disabled())
        zoom = np.ones(len(cohort.images), np.float32)
        paths = list(cohort.images.path)
        try:
            for chunk in _chunks(patients, sizes, chunk_images):
                if cache is not None:
                    features, zoom = cache.features, cache.zoom
                elif self.model.scale_in_trunk:   # the trunk reads the scale: features exist only inside a bag
                    features = None
                else:
                    rows = np.concatenate([cohort._groups[p] for p in chunk])
                    features = _RowFeatures(rows, self.model.num_features)
                    for idx, feats, z in trunk_features(self.model, paths, rows, self.transform, progress=False,
                                                        desc="image features"):
                        features.put(idx, feats)
                        zoom[idx] = z
                ds = BagDataset(cohort, patients=chunk, **(
                    {"transform": self.transform} if features is None else
                    {"features": features, "feature_zoom": zoom}))
                loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_bags)
                emb = embed_cohort(self.model, loader, split=splits, meta=meta, reports=texts)
                if texts:   # a patient without a report has no report embedding
                    empty = np.array([not t for t in cohort.reports.set_index("patient_id").report.loc[chunk]])
                    emb.report[empty] = np.nan
                bar.update(emb.n_images)
                self._check_scales(emb)
                yield emb
        finally:
            bar.close()

    def embed(self, cohort: str | Path | Cohort, batch_size: int = 32, progress: bool = True) -> Embeddings:
        """Patient, image (and, with reports, report) embeddings of every patient of ``cohort``, with image paths,
        effective nm/px and attention weights: an :class:`~emclip.evaluation.Embeddings` (``.save(path)``).

        >>> emb = trained.embed("my_cohort")
        >>> emb.patient.shape, emb.image.shape          # (patients, E), (images, E), L2-normalised
        """
        return Embeddings.concat(list(self.iter_embeddings(cohort, batch_size, progress=progress)))

    def _check_scales(self, emb: Embeddings) -> None:
        if self.scale_range_nm is None or not emb.n_images:
            return
        lo, hi = self.scale_range_nm
        s = emb.image_scales
        out = (s < lo * 0.999) | (s > hi * 1.001)
        if out.any():
            patients = len(np.unique(emb.image_patient[out]))
            warnings.warn(f"{int(out.sum())} of {emb.n_images} images ({patients} patient(s)) reach the model at an "
                          f"effective scale outside the {lo:.3g}-{hi:.3g} nm/px its training images covered (these: "
                          f"{s[out].min():.3g}-{s[out].max():.3g} nm/px); their embeddings extrapolate",
                          ScaleRangeWarning, stacklevel=3)

    @torch.no_grad()
    def embed_text(self, texts: str | list[str]) -> np.ndarray:
        """L2-normalised text embeddings [N, E] in the joint space (a report, a query, a class prompt)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("embed_text needs non-empty texts")
        return self.model.encode_text(texts).float().cpu().numpy()

    @torch.no_grad()
    def embed_images(self, paths: list[str | Path], nm_per_pixel) -> np.ndarray:
        """Image-level embeddings [N, E] of image files at their given nm/px (each image's own embedding, before
        pooling: what image-level search and zero-shot use)."""
        from .data.images import load_transformed
        nm = np.atleast_1d(np.asarray(nm_per_pixel, dtype=np.float64))
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if len(nm) != len(paths) or not np.isfinite(nm).all() or (nm <= 0).any():
            raise ValueError(f"embed_images needs one finite nm_per_pixel > 0 per image: {len(paths)} paths, "
                             f"nm_per_pixel {nm.tolist()}")
        loaded = [load_transformed(p, self.transform) for p in paths]
        images = torch.stack([t for t, _ in loaded])[None]
        scales = torch.tensor([[n * z for n, (_, z) in zip(nm, loaded)]], dtype=torch.float32)
        bags = self.model.encode_bags(scales, torch.ones(scales.shape, dtype=torch.bool), images=images)
        return bags.instances[0].float().cpu().numpy()

    # ------------------------------------------------------------------------------------------------ zero-shot

    def _prompts(self, classes) -> PromptSet:
        return self.prompts if classes is None else resolve_prompts(classes, [])

    @torch.no_grad()
    def class_embeddings(self, classes=None) -> tuple[PromptSet, np.ndarray]:
        """The zero-shot classes (the model's own prompts, or ``classes``: a prompt YAML path, a PromptSet or a
        list of names) and their prompt-ensembled embeddings [C, E], as the evaluation computes them."""
        prompts = self._prompts(classes)
        return prompts, ensemble(text_embeddings(self.model.encode_text, prompts))

    def zero_shot(self, emb: Embeddings, classes=None) -> dict:
        """Patient-level zero-shot of embedded patients: ``classes``, ``logits`` [P, C], ``probs`` (raw softmax) and
        ``prior_corrected`` (each class's mean log-probability over these patients subtracted, then softmax: no
        label used, the evaluation's ``mean_logprob`` correction)."""
        prompts, class_emb = self.class_embeddings(classes)
        logits = zero_shot_logits(emb.patient, class_emb, scale_from_logit(self.model.logit_scale))
        return {"classes": prompts.classes, "logits": logits, "probs": softmax(logits),
                "prior_corrected": softmax(mean_logprob_correction(logits))}

    def predict(self, cohort: str | Path | Cohort | Embeddings, classes=None, batch_size: int = 32,
                progress: bool = True, embeddings: Embeddings | None = None) -> pd.DataFrame:
        """Zero-shot diagnosis, one row per patient, with the evaluation's ``predictions.csv`` column names:
        ``patient_id``, ``diagnosis`` (when known), ``patient_pred`` and ``patient_p[<class>]`` (raw),
        ``prior_corrected_pred`` and ``prior_corrected_p[<class>]``, then ``n_images``, ``nm_per_pixel_min`` /
        ``_max`` (as given), ``most_attended_image`` and its ``attention`` (the first image under mean pooling,
        where every image weighs the same). ``embeddings``: the cohort's :meth:`embed` output when the caller has
        it already (nothing is embedded again).

        >>> trained.predict("new_patients").head()
        """
        prompts = self._prompts(classes)   # a bad class file fails before any image is read
        emb = embeddings if embeddings is not None else (
            cohort if isinstance(cohort, Embeddings) else self.embed(cohort, batch_size, progress))
        zs = self.zero_shot(emb, prompts)
        table = pd.DataFrame({"patient_id": emb.patient_ids})
        if (emb.diagnosis != "").any():
            table["diagnosis"] = emb.diagnosis
        for key, probs in (("patient", zs["probs"]), ("prior_corrected", zs["prior_corrected"])):
            table[f"{key}_pred"] = [zs["classes"][i] for i in probs.argmax(1)]
            for c, name in enumerate(zs["classes"]):
                table[f"{key}_p[{name}]"] = probs[:, c]
        table = pd.concat([table, _bag_summary(emb, self._given_scales(cohort, emb))], axis=1)
        return table

    def _given_scales(self, cohort, emb: Embeddings) -> np.ndarray:
        """The nm/px of each embedded image as the images table gives it (the embeddings hold the effective one)."""
        if isinstance(cohort, Embeddings):
            return emb.image_scales
        table = self.load_cohort(cohort).images
        given = dict(zip(table.path, table.nm_per_pixel))
        return np.array([given.get(p, np.nan) for p in emb.image_paths], dtype=np.float64)

    # ------------------------------------------------------------------------------------------ search, evaluate

    def search(self, index, text: str | None = None, patient: str | None = None, image: str | Path | None = None,
               nm_per_pixel: float | None = None, k: int = 10, level: str | None = None,
               split: str | None = None) -> pd.DataFrame:
        """The ``k`` patients (``level="patient"``) or images (``"image"``) of an embedding index most similar to
        one query: a ``text``, an indexed ``patient`` id, or an ``image`` (an indexed path, or any image file with
        its ``nm_per_pixel``). ``index`` is a folder ``python -m emclip.embed`` wrote, or a loaded EmbeddingIndex.

        >>> trained.search("index/", text="amyloid fibrils 8-12 nm", k=5)
        """
        return search_index(index, text=text, patient=patient, image=image, nm_per_pixel=nm_per_pixel, k=k, level=level,
                      split=split, model=self)

    def evaluate(self, cohort: str | Path | None = None, out: str | Path | None = None, **kwargs) -> dict:
        """The evaluation protocol on ``cohort`` (None: the run's own test split), returning the metrics dict.

        For a run, an external cohort is scored with every patient and the linear and few-shot probes fitted on
        the run's own train split (``evaluation.cached.evaluate_run(..., data_dir=cohort)``). An exported model
        folder carries no training embeddings: zero-shot and retrieval on every patient of ``cohort``, no probes.
        """
        if self.kind == "run":
            from .evaluation.cached import evaluate_run
            return evaluate_run(self.source, out=out, **({"data_dir": str(resolve(cohort))} if cohort else {}),
                                **kwargs)
        if cohort is None:
            raise ValueError("an exported model folder has no cohort of its own: name the cohort to evaluate on")
        from .evaluation.report import evaluate
        if out is None:
            raise ValueError("evaluate needs an output folder (out=...) for metrics.json and the figures")
        emb = self.embed(cohort)
        emb.split = np.full(emb.n_patients, "external")
        return evaluate(emb, self.model.encode_text, self.model.logit_scale, out, classes=self.prompts,
                        split="external", probe=False, shots=(), name=self.source.name, **kwargs)

    def export(self, out: str | Path, force: bool = False) -> Path:
        """Write a self-contained model folder (weights, config, preprocessing, prompts, training scale range,
        model card, checksums; see ``docs/model_folder.md``) that :func:`load` reads without the run or its cohort.
        """
        from .serving.modelfolder import write_model_folder
        if self.kind != "run":
            raise ValueError(f"{self.source} is already an exported model folder: copy it as it is")
        from .train.runinfo import load_run_cohort
        metrics_path = self.source / "eval" / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        cohort = load_run_cohort(self.config)
        card = {"name": self.source.name, "source": f"{self.source.name} ({self.info.get('checkpoint')} checkpoint)",
                "training_cohort": cohort.summary(), "metrics": metrics, "synthetic": _is_synthetic(cohort)}
        # a folder meant to be shared names no local path: only the last part of each is kept
        train_config = {k: (Path(v).name if k in _LOCAL_PATHS and isinstance(v, str) else v)
                        for k, v in self.config.to_dict().items()}
        return write_model_folder(self.model, resolve(out), prompts=self.prompts, scale_range_nm=self.scale_range_nm,
                                  train_config=train_config, card=card, force=force)


_LOCAL_PATHS = ("data_dir", "run_dir", "cache_dir", "labels_file")


def _is_synthetic(cohort: Cohort) -> bool:
    """True when the cohort's images were written by emclip's generator (it signs every TIFF it writes)."""
    import tifffile
    try:
        with tifffile.TiffFile(cohort.images.path.iloc[0]) as tif:
            return tif.pages[0].software == "emclip"
    except Exception:  # noqa: BLE001 - not a TIFF, or unreadable: not ours
        return False


def search_index(index, text: str | None = None, patient: str | None = None, image: str | Path | None = None,
           nm_per_pixel: float | None = None, k: int = 10, level: str | None = None, split: str | None = None,
           model: TrainedModel | None = None) -> pd.DataFrame:
    """:meth:`TrainedModel.search`; a ``patient`` or an indexed ``image`` query needs no model (its vector is in
    the index), a ``text`` or a new image file does. A patient is never its own hit, nor is an indexed image's
    patient. Columns: ``rank``, ``score`` (cosine similarity), then the patient's or image's metadata."""
    from .serving.index import EmbeddingIndex, EmbeddingIndexError
    index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.load(resolve(index))
    if sum(q is not None for q in (text, patient, image)) != 1:
        raise ValueError("search needs exactly one query: a text, a patient id or an image")
    if level not in (None, "patient", "image"):
        raise ValueError(f"level must be 'patient' or 'image', got {level!r}")
    level = level or ("image" if image is not None else "patient")
    if patient is not None:
        return index.search(index.patient_vector(patient), level=level, k=k, split=split, exclude_patients=(patient,))
    if image is not None and nm_per_pixel is None:
        path = str(Path(image).expanduser().resolve()) if Path(image).expanduser().exists() else str(image)
        owner = tuple(index.images.patient_id[index.images.path == path])
        return index.search(index.image_vector(path), level=level, k=k, split=split, exclude_patients=owner)
    if model is None:
        raise ValueError("a text query (or a new image file) is embedded by the model that wrote the index: pass it")
    written_by = index.meta.get("model_identity")
    if written_by is not None and written_by != model.identity:
        raise EmbeddingIndexError(f"the index was written by another model ({index.meta.get('model')}, weights "
                                  f"{written_by}); {model.source} has weights {model.identity}: embed the cohort "
                                  f"again with this model, or search with that one")
    query = model.embed_text(text)[0] if text is not None else model.embed_images([image], [nm_per_pixel])[0]
    return index.search(query, level=level, k=k, split=split)


class _RowFeatures:
    """Trunk features of some rows of a cohort's images table, indexed by those row numbers (BagDataset reads
    ``features[rows]``): one chunk of a cohort, filled batch by batch."""

    def __init__(self, rows: np.ndarray, dim: int):
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.values = np.empty((len(self.rows), dim), np.float32)

    def _local(self, rows) -> np.ndarray:
        local = np.searchsorted(self.rows, np.asarray(rows, dtype=np.int64))
        if (local >= len(self.rows)).any() or (self.rows[np.minimum(local, len(self.rows) - 1)] != rows).any():
            raise IndexError("rows outside this chunk")
        return local

    def put(self, rows, values: np.ndarray) -> None:
        self.values[self._local(rows)] = values

    def __getitem__(self, rows) -> np.ndarray:
        return self.values[self._local(rows)]


def _chunks(patients: list[str], sizes: np.ndarray, limit: int) -> Iterator[list[str]]:
    """Consecutive groups of patients holding about ``limit`` images (a bigger patient is a group of its own)."""
    group, total = [], 0
    for pid, n in zip(patients, sizes):
        if group and total + n > limit:
            yield group
            group, total = [], 0
        group.append(pid)
        total += int(n)
    if group:
        yield group


def _bag_summary(emb: Embeddings, given_nm: np.ndarray) -> pd.DataFrame:
    """Per patient: images, nm/px range (as given), the most attended image and its weight."""
    owner = emb.image_patient
    n = np.bincount(owner, minlength=emb.n_patients)
    attention = np.where(np.isfinite(emb.image_attention), emb.image_attention, 0.0)
    order = np.lexsort((-attention, owner))                  # by patient, highest weight first (ties: bag order)
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    top = order[first[n > 0]]
    out = pd.DataFrame({"n_images": n, "nm_per_pixel_min": np.nan, "nm_per_pixel_max": np.nan,
                        "most_attended_image": "", "attention": np.nan})
    with_images = np.flatnonzero(n > 0)
    out.loc[with_images, "nm_per_pixel_min"] = np.minimum.reduceat(given_nm[np.argsort(owner, kind="stable")],
                                                                   first[with_images])
    out.loc[with_images, "nm_per_pixel_max"] = np.maximum.reduceat(given_nm[np.argsort(owner, kind="stable")],
                                                                   first[with_images])
    out.loc[with_images, "most_attended_image"] = emb.image_paths[top]
    out.loc[with_images, "attention"] = emb.image_attention[top]
    return out
