"""Glue for the numbered notebooks: parameter sets, run evaluation, training curves, ablations, notebook execution.

Notebooks stay thin drivers: everything they compute is a call into this module or the package.
``python -m emclip.pipeline demo`` executes notebooks 01 -> 05 with papermill into ``reports/demo/`` (``make demo``).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .data import BagDataset, ImageTransform, collate_bags
from .evaluation import Embeddings, embed_cohort, evaluate, load_prompts, resolve_prompts
from .evaluation.embeddings import default_device
from .evaluation.zeroshot import prompts_from_diagnoses
from .paths import project_root, resolve
from .digests import file_sha256
from .train.cache import build_feature_cache, feature_cache_key, image_files_digest
from .train.checkpoint import load_model_weights, resolve_checkpoint
from .train.config import TrainConfig
from .paramsets import DEFAULT_PARAMS, load_params, params_name, report_dir, train_config  # noqa: F401 - notebooks
from .train.loop import build_run_model
from .train.runinfo import load_run_cohort
from .notebook_params import check_parameters  # noqa: F401 - notebooks call it through pipeline
from .reports import execute_notebook, to_html, write_index  # noqa: F401 - notebooks call them through pipeline
from .summary import per_class_auc, pair_table, retrieval_table, zero_shot_table  # noqa: F401 - likewise
from .train.text_cache import CachedTextModel, TextFeatures

NOTEBOOKS = ("01_data_audit", "02_features", "03_train", "04_ablations", "05_evaluation")


def read_log(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(resolve(run_dir)) / "metrics_log.csv")


def training_curves(run_dir: str | Path, out: str | Path | None = None):
    """Training loss, learning rate, temperature and validation loss against the step."""
    log = read_log(run_dir)
    steps, val = log[log.loss.notna()], log[log.val_loss.notna()]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    ax[0].plot(steps.step, steps.loss, lw=0.8, alpha=0.5, label="train (per step)")
    ax[0].plot(steps.step, steps.loss.rolling(10, min_periods=1).mean(), lw=1.5, label="train (10-step mean)")
    ax[0].plot(val.step, val.val_loss, "o-", label="validation (whole split)")
    ax[0].set(xlabel="step", ylabel="contrastive loss", title="loss")
    ax[0].legend(fontsize=8)
    ax[1].plot(steps.step, steps.logit_scale)
    ax[1].set(xlabel="step", title="logit scale  exp(t)")
    ax[2].plot(steps.step, steps.lr)
    ax[2].set(xlabel="step", title="learning rate")
    if "val_recall" in val:
        ax[3].plot(val.step, val.val_recall, "o-", color="C2")
    ax[3].set(xlabel="step", title="validation patient<->report\nmean Recall@1/5/10 (selects 'best')")
    fig.suptitle(Path(resolve(run_dir)).name)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def _prompt_classes(cohort):
    """The bundled renal prompts when they cover the cohort's diagnoses. When they cover only some, the cohort's
    classes keep the curated synonyms and templates of those they share, and a warning names the others (they are
    prompted by their name alone); with none shared, the classes and generic templates come from the cohort."""
    renal = load_prompts("renal_em")
    dx = {str(d) for d in cohort.reports.diagnosis.dropna()}
    if dx and dx <= set(renal.classes):
        return renal
    shared = dx & set(renal.classes)
    if not shared:
        return None
    others = sorted(dx - shared)
    warnings.warn(f"zero-shot prompts: {len(others)} diagnosis value(s) are not among the bundled renal classes and "
                  f"are prompted by name only: {', '.join(repr(o) for o in others)}", UserWarning, stacklevel=2)
    return prompts_from_diagnoses(dx, known=renal, templates=renal.templates)


def run_checkpoint(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """The checkpoint folder ``load_run_model`` reads, verified: ``best`` (or ``latest``, or a step folder's name);
    a missing or damaged one is an error or a named substitute, never a silent one."""
    return resolve_checkpoint(resolve(run_dir) / "checkpoints", checkpoint, log=print)


def load_run_model(run_dir: str | Path, checkpoint: str | Path = "best", device: str | torch.device | None = None):
    """The trained model of a run (its verified ``best`` checkpoint, see :func:`run_checkpoint`, or a checkpoint
    folder that caller resolved with it) and its config, on ``device`` (default: the accelerator when one is present,
    else the CPU)."""
    run = resolve(run_dir)
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    model = build_run_model(cfg)
    ckpt = checkpoint if isinstance(checkpoint, Path) else run_checkpoint(run, checkpoint)
    load_model_weights(model, ckpt, verify=False)   # run_checkpoint has verified it
    return model.to(device if device is not None else default_device()).eval(), cfg


def embed_run(run_dir: str | Path, batch_size: int = 32, model=None, cfg: TrainConfig | None = None,
              cohort=None, cache_key: str | None = None) -> Embeddings:
    """Embed every patient of the run's cohort with its best model (cached trunk features in cache mode).

    ``model``, ``cfg`` and ``cohort`` (and the feature ``cache_key``) may be passed when the caller already has them."""
    if model is None or cfg is None:
        model, cfg = load_run_model(run_dir)
    cohort = cohort if cohort is not None else load_run_cohort(cfg)
    if cfg.mode == "cache":
        cache = build_feature_cache(model, cohort, cfg.cache_path, key=cache_key)
        ds = BagDataset(cohort, None, features=cache.features, feature_zoom=cache.zoom)
    else:
        ds = BagDataset(cohort, None, transform=ImageTransform.from_preprocess(model.preprocess))
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_bags)
    splits = dict(zip(cohort.reports.patient_id, cohort.reports.split))
    if cfg.lock_text:   # the frozen text transformer's report features are cached like the image features
        model = CachedTextModel(model, TextFeatures.build(model, cohort, cfg.eval_batch_size, cfg.cache_path))
    emb = embed_cohort(model, loader, split=splits, meta={"run_dir": str(resolve(run_dir)), **cfg.to_dict(),
                                                          "labels": cohort.summary()["labels"]})
    return emb


def supervised_bound(model, cfg: TrainConfig, cohort, emb: Embeddings, classes: list[str], split: str = "test",
                     cache_key: str | None = None):
    """The supervised MIL upper bound (``evaluation.bounds.supervised_mil``) on the run's cached trunk features.

    It does not depend on the contrastive model, only on the features, labels and splits, so it is computed once
    and kept in ``<cache_dir>/bounds/`` (every arm of an ablation shares it). None in end-to-end mode (no cache)."""
    import hashlib
    from .evaluation import bounds
    from .paths import write_text_atomic
    if cfg.mode != "cache":
        return {"skipped": "end-to-end run: no cached trunk features"}
    cache = build_feature_cache(model, cohort, cfg.cache_path, key=cache_key)
    y = np.array([classes.index(d) if d in classes else -1 for d in emb.diagnosis])
    key = hashlib.sha256(json.dumps([cache.path.name, split, classes, emb.patient_ids.tolist(), y.tolist(),
                                     emb.split.tolist()]).encode() + Path(bounds.__file__).read_bytes())
    out = cfg.cache_path / "bounds" / f"supervised_mil-{key.hexdigest()[:20]}.json"
    if out.is_file():
        return json.loads(out.read_text())
    feats, scales = [], []
    for pid in emb.patient_ids:
        rows = cohort.bag(str(pid)).index.to_numpy()
        feats.append(np.asarray(cache.features[rows], dtype=np.float32))
        zoom = 1.0 if cache.zoom is None else np.asarray(cache.zoom[rows])
        scales.append(cohort.images.nm_per_pixel.to_numpy()[rows] * zoom)
    result = bounds.supervised_mil(feats, scales, y, emb.split, len(classes), emb.patient_ids, test_split=split)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result))
    return result


def _digest(obj) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _table_digest(df: pd.DataFrame) -> str:
    """Digest of a table's values, in row order (vectorised: cheap at 600k rows)."""
    import hashlib
    h = hashlib.sha256(json.dumps([list(df.columns), len(df)]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def evaluation_key(ckpt: Path, cfg: TrainConfig, cohort, split, n_boot, topj, figures,
                   feature_key: str | None) -> dict:
    """Everything an evaluation's metrics depend on, each part small enough to say what changed.

    ``{"digest": ..., "parts": {...}}``: the metrics schema and emclip version, the arguments of ``evaluate_run``,
    the checkpoint read (path, step, SHA-256 of its weights), the run's configuration, the cohort as derived (reports:
    patient, split, diagnosis, its source and the report text; images: patient, path, nm/px), the image files
    (the feature cache key in cache mode, else the same one-stat-per-file digest) and the zero-shot prompts."""
    from . import __version__
    from .evaluation.report import SCHEMA_VERSION
    meta_path = ckpt / "meta.json"
    ckpt_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    diagnoses = [d if isinstance(d, str) else None for d in cohort.reports.diagnosis]
    try:
        prompts = resolve_prompts(_prompt_classes(cohort), diagnoses)
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


def evaluate_run(run_dir: str | Path, split: str = "test", n_boot: int = 1000, topj=(1, 3), out: str | Path | None = None,
                 figures: bool = True, reuse: bool = True, name: str = "eval", log=print) -> dict:
    """Full evaluation protocol of a trained run on ``split``: writes ``<run>/<name>/metrics.json`` and figures.

    The metrics file records its ``evaluation_key`` (``evaluation_key()``: checkpoint, arguments, configuration,
    cohort and diagnoses as derived, image files, prompts, metrics schema). With ``reuse``, an evaluation already in
    ``<run>/<name>`` whose key equals the current one is returned instead of being recomputed; otherwise what changed
    is printed and everything is recomputed. ``out`` also receives a copy.
    """
    import shutil
    from .evaluation.report import _dumps
    from .paths import write_text_atomic
    run = resolve(run_dir)
    target = run / name
    metrics_path = target / "metrics.json"
    ckpt = run_checkpoint(run)
    model, cfg = load_run_model(run, ckpt)
    cohort = load_run_cohort(cfg)
    feature_key = feature_cache_key(model, cohort) if cfg.mode == "cache" else None
    key = evaluation_key(ckpt, cfg, cohort, split, n_boot, topj, figures, feature_key)
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
        emb.save(run / "embeddings.npz")
        with torch.no_grad():
            prompts = _prompt_classes(cohort)
            classes = resolve_prompts(prompts, emb.diagnosis).classes
            metrics = evaluate(emb, model.encode_text, model.logit_scale, target, classes=prompts,
                               split=split, n_boot=n_boot, topj=topj, figures=figures, name=run.name,
                               supervised=supervised_bound(model, cfg, cohort, emb, classes, split, feature_key))
        metrics["evaluation_key"] = key
        write_text_atomic(metrics_path, _dumps(metrics))
    if out is not None and Path(out).resolve() != target.resolve():
        Path(out).mkdir(parents=True, exist_ok=True)
        for f in target.iterdir():
            shutil.copy2(f, Path(out) / f.name)
    return metrics


def label_sentence(metrics: dict) -> str:
    """One sentence for a report: where the evaluated patients' diagnoses came from and who was left out."""
    lab = metrics.get("labels")
    if not lab:
        return "Diagnosis source not recorded (metrics.json written before schema version 2)."
    src, split = lab["sources"], metrics.get("split") or "all"
    parts = [f"{src[k]} {k}" for k in ("given", "labeler") if src[k]]
    text = f"**Diagnoses** of the {metrics['n_patients']} {split} patients: " + (", ".join(parts) or "none")
    if src["labeler"]:
        hedge = "hedged diagnoses counted" if lab.get("uncertain") == "positive" else "hedged diagnoses excluded"
        text += f" (from the {lab.get('labeler', 'report labeler')}; {hedge})"
    excluded = lab["n_no_diagnosis"] + lab["n_diagnosis_not_in_classes"]
    if excluded:
        text += (f". {excluded} patient(s) are excluded from zero-shot and the probe: {lab['n_no_diagnosis']} without "
                 f"a usable diagnosis, {lab['n_diagnosis_not_in_classes']} with a diagnosis outside the classes")
    return text + "."


def run_all(params: str = DEFAULT_PARAMS, notebooks=NOTEBOOKS, summary: bool = True, out: str | Path | None = None,
            show_code: bool = False) -> Path:
    """Execute the numbered notebooks in order with ``params`` into ``reports/<params>/`` (or ``out``): executed
    .ipynb, .html (code hidden unless ``show_code``) and an ``index.html`` over all of them.

    With ``summary`` the compact committed summary (ablation table, key figures, timings) is refreshed in
    ``reports/summary/`` when ``params`` is the reference demo.
    """
    custom = out is not None
    out = Path(out) if custom else report_dir(params)
    start = time.perf_counter()
    for name in notebooks:
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.0f} s] executing {name} ...", flush=True)
        parameters = {"params": params}
        if custom and name != "03_train":  # 03 writes into its run folder; the others into the report folder
            parameters["report_dir"] = str(out / "evaluation" if name == "05_evaluation" else out)
        execute_notebook(name, out, parameters, show_code=show_code)
        print(f"[{time.perf_counter() - start:6.0f} s] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    total = time.perf_counter() - start
    timings = json.loads((out / "timings.json").read_text())
    timings["total"] = round(total, 1)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    if summary and load_params(params)["name"] == DEFAULT_PARAMS:
        _refresh_summary(out)
    write_index(out, f"emclip · {load_params(params)['name']} run", _index_summary(out))
    print(f"all notebooks done in {total:.0f} s; reports in {out} (open {out / 'index.html'})")
    return out


def _index_summary(out: Path) -> str:
    """The headline of a run for its index page: the evaluation's conclusion sentence, if there is one."""
    path = out / "evaluation" / "metrics.json"
    if not path.exists():
        return ""
    from .summary import conclusion
    return f"<p>{conclusion(json.loads(path.read_text()), html=True)}</p>"


def _refresh_summary(out: Path) -> None:
    """Copy the small, reader-facing results of the reference run into the committed ``reports/summary/``."""
    import shutil
    dest = project_root() / "reports" / "summary"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("ablation.md", "ablation.png", "metrics.json", "timings.json", "audit_overview.png",
                 "features_pca_by_scale.png", "cohort_grid.png"):
        if (out / name).exists():
            shutil.copy2(out / name, dest / ("ablation_metrics.json" if name == "metrics.json" else name))
    for name in ("roc.png", "confusion_matrix.png", "recall_at_k.png", "attention.png", "metrics.json", "by_scale.png",
                 "attention_by_scale.png", "embedding_map.png", "prompt_similarity.png"):
        if (out / "evaluation" / name).exists():
            shutil.copy2(out / "evaluation" / name, dest / f"evaluation_{name}")


if __name__ == "__main__":
    import sys
    run_all(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PARAMS)
