"""Evaluation of a trained run, recomputed only when something its metrics depend on changed.

``evaluation_key`` lists those things (checkpoint, arguments, configuration, cohort as derived, image files,
prompts, metrics schema); ``evaluate_run`` reuses a stored ``metrics.json`` whose key is equal and otherwise says,
with ``key_changes``, what changed before recomputing.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from .. import __version__
from ..digests import file_sha256
from ..paths import resolve, write_text_atomic
from ..train.cache import feature_cache_key, image_files_digest
from ..train.config import TrainConfig
from ..train.text_cache import cached_text_encoder
from ..train.runinfo import load_run_cohort
from .external import (
    ExternalCohort, combine_for_external, embed_external, external_folder, external_record, external_supervised_bound,
    is_inside, load_external_cohort)
from .report import SCHEMA_VERSION, _dumps, evaluate, to_json_safe
from .runs import embed_run, load_run_model, prompt_classes, run_checkpoint, supervised_bound
from .settings import DEFAULT_EVALUATION, EXTERNAL_SPLIT
from .zeroshot import resolve_prompts

__all__ = ["evaluation_key", "key_changes", "evaluate_run"]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _table_digest(df: pd.DataFrame) -> str:
    """Digest of a table's values, in row order (vectorised: cheap at 600k rows)."""
    h = hashlib.sha256(json.dumps([list(df.columns), len(df)]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def evaluation_key(ckpt: Path, cfg: TrainConfig, cohort, split, n_boot, topj, figures,
                   feature_key: str | None, external: ExternalCohort | None = None) -> dict:
    """Everything an evaluation's metrics depend on, each part small enough to say what changed.

    ``{"digest": ..., "parts": {...}}``: the metrics schema and emclip version, the arguments of ``evaluate_run``,
    the checkpoint read (path, step, SHA-256 of its weights), the run's configuration, the cohort as derived (reports:
    patient, split, diagnosis, its source and the report text; images: patient, path, nm/px), the image files
    (the feature cache key in cache mode, else the same one-stat-per-file digest) and the zero-shot prompts.
    With an ``external`` cohort, its folder, derived tables (without its ignored split column) and image files
    are one more part."""
    meta_path = ckpt / "meta.json"
    ckpt_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    diagnoses = [d if isinstance(d, str) else None for d in cohort.reports.diagnosis]
    try:
        prompts = resolve_prompts(prompt_classes(cohort), diagnoses)
        prompt_part = _digest({"classes": prompts.classes, "synonyms": prompts.synonyms,
                               "templates": prompts.templates})
    except ValueError as err:   # e.g. a cohort without any diagnosis: the evaluation itself says what is wrong
        prompt_part = f"none ({err})"
    reports = cohort.reports[["patient_id", "split", "diagnosis", "diagnosis_source", "report"]]
    images = cohort.images[["patient_id", "path", "nm_per_pixel"]]
    parts = {
        "schema_version": SCHEMA_VERSION, "emclip_version": __version__,
        "split": split, "n_boot": int(n_boot), "topj": [int(j) for j in topj], "figures": bool(figures),
        "checkpoint": {"path": str(ckpt), "step": ckpt_meta.get("step"),
                       "frozen_digest": ckpt_meta.get("frozen_digest"),
                       # verified against this recorded checksum when the checkpoint was resolved
                       "sha256": (ckpt_meta.get("checksums") or {}).get("model.safetensors")
                       or file_sha256(ckpt / "model.safetensors")},
        "config": cfg.to_dict(),
        "cohort": {"reports": _table_digest(reports), "images": _table_digest(images),
                   "labels": _digest(cohort.labels)},
        # the image files: the feature cache key (trunk + every file's identity) in cache mode, else the files alone
        **({"feature_cache": feature_key} if feature_key is not None else
           {"image_files": image_files_digest(cohort)}),
        "prompts": prompt_part,
    }
    if external is not None:
        ext = external.cohort
        parts["external"] = {
            "data_dir": str(external.root),
            "reports": _table_digest(ext.reports[["patient_id", "diagnosis", "diagnosis_source", "report"]]),
            "images": _table_digest(ext.images[["patient_id", "path", "nm_per_pixel"]]),
            "labels": _digest(ext.labels),
            **({"feature_cache": external.feature_key} if external.feature_key is not None else
               {"image_files": image_files_digest(ext)})}
    return {"digest": _digest(parts), "parts": parts}


def _show(value) -> str:
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return repr(value)


def key_changes(old: dict, new: dict) -> list[str]:
    """What differs between two evaluation keys, one phrase per piece (``topj changed (1, 3) -> (1, 5)``)."""
    old_parts, new_parts = old.get("parts") or {}, new["parts"]
    changes = []
    for name, value in new_parts.items():
        before = old_parts.get(name, "<not recorded>")
        if name == "figures" and before is True and value is False:   # figures made but not asked for: still fine
            continue
        if before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            for sub in sorted(set(value) | set(before)):
                if value.get(sub, "<absent>") != before.get(sub, "<absent>"):
                    changes.append(f"{name}.{sub} changed {_show(before.get(sub, '<absent>'))} -> "
                                   f"{_show(value.get(sub, '<absent>'))}")
        else:
            changes.append(f"{name} changed {_show(before)} -> {_show(value)}")
    return changes


def evaluate_run(run_dir: str | Path, split: str = DEFAULT_EVALUATION.split, n_boot: int = DEFAULT_EVALUATION.bootstrap,
                 topj=DEFAULT_EVALUATION.topj, out: str | Path | None = None,
                 figures: bool = True, reuse: bool = True, name: str | None = None, log=print,
                 data_dir: str | Path | None = None) -> dict:
    """Full evaluation protocol of a trained run: writes ``<run>/<name>/metrics.json``, ``predictions.csv`` and
    figures, and returns the metrics.

    Without ``data_dir`` the run's own cohort is scored on ``split`` (``name`` defaults to ``eval``). With
    ``data_dir``, another hospital's cohort folder (the same data contract) is the external validation set: every
    one of its patients is scored (its own split column is ignored; diagnoses are given or derived with the run's
    labeler settings), with the run's own classes and prompts; the linear and few-shot probes, the supervised MIL
    bound (cache mode) and the optimal-transport prior learn from the run's own train (and val) patients only
    (``evaluation.external``). ``split`` must then stay ``"test"``, ``name`` defaults to
    ``eval-external-<cohort folder name>``, and metrics.json gains ``external`` (``docs/metrics_schema.md``).
    Nothing is written into the cohort folder.

    The metrics file records its ``evaluation_key`` (``evaluation_key()``: checkpoint, arguments, configuration,
    cohort(s) and diagnoses as derived, image files, prompts, metrics schema). With ``reuse``, an evaluation already
    in ``<run>/<name>`` whose key equals the current one is returned instead of being recomputed; otherwise what
    changed is printed and everything is recomputed. ``out`` also receives a copy.

    Example::

        internal = evaluate_run("runs/demo")                                    # the run's own test split
        external = evaluate_run("runs/demo", data_dir="data/hospital_b")        # every patient of another cohort
        print(emclip.summary.external_table(internal, external))                # side by side
    """
    run = resolve(run_dir)
    ckpt = run_checkpoint(run)
    model, cfg = load_run_model(run, ckpt)
    cohort = load_run_cohort(cfg)
    feature_key = feature_cache_key(model, cohort) if cfg.mode == "cache" else None
    external = None
    if data_dir is not None:
        if split != "test":
            raise ValueError(f"split={split!r} selects patients of the run's own cohort; with data_dir every patient "
                             f"of the external cohort is scored: leave split at 'test'")
        external = load_external_cohort(data_dir, cfg, model)
        split = EXTERNAL_SPLIT
    target = run / (name or (external_folder(external.root) if external is not None else "eval"))
    if external is not None and out is not None and is_inside(Path(out), external.root):
        raise ValueError(f"out={out} is inside the external cohort {external.root}: nothing is written into a cohort "
                         f"folder; choose another out")
    metrics_path = target / "metrics.json"
    key = evaluation_key(ckpt, cfg, cohort, split, n_boot, topj, figures, feature_key, external)
    metrics = None
    if reuse and metrics_path.exists():
        try:
            stored = json.loads(metrics_path.read_text())
            old_key = stored.get("evaluation_key") if isinstance(stored, dict) else None
        except (OSError, ValueError) as err:
            stored, old_key = None, None
            log(f"recomputing {metrics_path}: it cannot be read ({err})")
        if stored is not None:
            if not isinstance(old_key, dict) or "digest" not in old_key:
                log(f"recomputing {metrics_path}: no evaluation key recorded (written by an older emclip)")
            elif old_key["digest"] == key["digest"] or not key_changes(old_key, key):
                metrics = stored
                log(f"reusing {metrics_path}: same checkpoint, arguments, cohort and prompts")
            else:
                log(f"recomputing {metrics_path}: " + "; ".join(key_changes(old_key, key)))
    if metrics is None:
        metrics_path.unlink(missing_ok=True)   # a failed recomputation must not leave the old metrics to be reused
        emb = embed_run(run, model=model, cfg=cfg, cohort=cohort, cache_key=feature_key)   # one model, one cohort
        with torch.no_grad():
            prompts = prompt_classes(cohort)
            # a frozen text tower's prompt features are the same for every run: cached beside the report features
            encode_text = cached_text_encoder(model, cfg.cache_path, cfg.eval_batch_size, log) if cfg.lock_text \
                else model.encode_text
            if external is None:
                emb.save(run / "embeddings.npz")
                classes = resolve_prompts(prompts, emb.diagnosis).classes
                metrics = evaluate(emb, encode_text, model.logit_scale, target, classes=prompts,
                                   split=split, n_boot=n_boot, topj=topj, figures=figures, name=run.name,
                                   supervised=supervised_bound(model, cfg, cohort, emb, classes, split, feature_key))
            else:
                metrics = _evaluate_external(run, model, cfg, cohort, feature_key, external, emb, encode_text,
                                             prompts, target, n_boot, topj, figures)
        metrics["evaluation_key"] = key
        write_text_atomic(metrics_path, _dumps(metrics))
    if out is not None and Path(out).resolve() != target.resolve():
        Path(out).mkdir(parents=True, exist_ok=True)
        for f in target.iterdir():
            shutil.copy2(f, Path(out) / f.name)
    return metrics


def _evaluate_external(run, model, cfg, cohort, feature_key, external, internal_emb, encode_text, prompts, target,
                       n_boot, topj, figures) -> dict:
    """``evaluate`` on the external patients beside the run's own train and val patients (``evaluation.external``)."""
    # the classes are the run's: resolved from its own cohort's diagnoses, as the internal evaluation resolves them
    prompt_set = resolve_prompts(prompts, internal_emb.diagnosis)
    ext_emb = embed_external(run, model, cfg, external)
    ext_emb.save(target / "embeddings.npz")   # ids, paths and embeddings of the external patients only
    combined = combine_for_external(internal_emb, ext_emb)
    supervised = external_supervised_bound(model, cfg, cohort, feature_key, external, combined, prompt_set.classes)
    metrics = evaluate(combined.embeddings, encode_text, model.logit_scale, target, classes=prompt_set,
                       split=EXTERNAL_SPLIT, n_boot=n_boot, topj=topj, figures=figures,
                       name=f"{run.name} on {external.name}", supervised=supervised)
    metrics["external"] = to_json_safe(external_record(external, ext_emb))
    return metrics
