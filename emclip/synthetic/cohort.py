"""Write the embedded synthetic cohort to disk in exactly the cohort contract (images.csv, reports.csv, TIFFs)."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from tqdm.auto import tqdm

from ..data.splits import assign_splits
from ..progress import bars_disabled
from .render import render_field
from .reports import write_report
from .specs import DiseaseSpec, PatientScene, load_specs, sample_patient

DEMO_PATIENTS = 500   # the embedded cohort of `make demo` (params/demo.yaml takes it from here)

SCALE_RANGE_NM = (2.0, 100.0)
MAX_IMAGES = 40
CAMERA_PIXEL_NM = 60_000.0      # detector pixel pitch: magnification = pitch / nm_per_pixel (2 nm/px -> 30,000x)


def _patient_rng(seed: int, index: int) -> np.random.Generator:
    # One stream per patient: the cohort is identical whatever the number of worker processes.
    return np.random.default_rng([seed, index, 0x5EED])


def render_image(spec: DiseaseSpec, scene: PatientScene, nm_per_px: float, image_size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One field of a patient at ``nm_per_px`` true physical nm/px, as the generator writes it (float in [0, 1]).

    A size twin is its partner's scene with every length x ``size_ratio``: rendering that scene at
    nm_per_px / size_ratio gives exactly the pixels of the twin at nm_per_px. This line is the confusable pair.
    """
    return render_field(scene.params, nm_per_px / spec.size_ratio, image_size, rng)


def _render_patient(args) -> tuple[list[dict], dict]:
    index, diagnosis, seed, out_dir, image_size = args
    spec = load_specs()[diagnosis]
    rng = _patient_rng(seed, index)
    scene = sample_patient(spec, rng)
    pid = f"P{index + 1:05d}"
    n_images = int(np.clip(round(np.exp(rng.uniform(0, np.log(MAX_IMAGES)))), 1, MAX_IMAGES))
    sixteen_bit = rng.random() < 0.3              # some microscopes write 16-bit files
    folder = Path(out_dir) / "images" / pid
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n_images):
        scale = float(np.round(np.exp(rng.uniform(*np.log(SCALE_RANGE_NM))), 3))
        img = render_image(spec, scene, scale, image_size, rng)
        data = np.round(img * (65535 if sixteen_bit else 255)).astype(np.uint16 if sixteen_bit else np.uint8)
        rel = f"images/{pid}/{pid}_{k + 1:02d}.tif"
        tifffile.imwrite(Path(out_dir) / rel, data, description=f"nm_per_pixel={scale}", software="emclip",
                         metadata=None)
        rows.append({"patient_id": pid, "path": rel, "nm_per_pixel": scale,
                     "magnification": int(round(CAMERA_PIXEL_NM / scale, -1)), "bit_depth": 16 if sixteen_bit else 8})
    report = {"patient_id": pid, "report": write_report(scene, rng), "diagnosis": diagnosis}
    return rows, report


def generate_cohort(out_dir: str | Path, n_patients: int = DEMO_PATIENTS, seed: int = 0, image_size: int = 256,
                    workers: int | None = None, progress: bool = True, with_diagnosis: bool = True) -> Path:
    """Generate ``n_patients`` patients with balanced diagnoses into ``out_dir``; same seed, same bytes.

    ``with_diagnosis=False`` leaves the ``diagnosis`` column out of ``reports.csv`` (the situation of a real archive,
    whose labels must come from the reports) and writes the truth to ``diagnosis_truth.csv`` instead, which the
    cohort loader never reads."""
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(load_specs())
    weights = np.array([load_specs()[n].prevalence for n in names], float)
    rng = np.random.default_rng(seed)
    # Balanced assignment (by prevalence) then shuffled, so small cohorts still contain every diagnosis.
    quota = np.floor(weights / weights.sum() * n_patients).astype(int)
    extra = rng.choice(len(names), n_patients - quota.sum(), replace=False, p=weights / weights.sum()) \
        if n_patients - quota.sum() <= len(names) else rng.choice(len(names), n_patients - quota.sum())
    dx = [names[i] for i, q in enumerate(quota) for _ in range(q)] + [names[i] for i in extra]
    dx = [dx[i] for i in rng.permutation(len(dx))]
    jobs = [(i, dx[i], seed, str(out), image_size) for i in range(n_patients)]
    workers = workers or min(os.cpu_count() or 1, 8)
    image_rows, report_rows = [], []
    bar = tqdm(total=n_patients, desc="rendering patients", unit="patient", disable=not progress or bars_disabled())
    if workers == 1:
        results = map(_render_patient, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_render_patient, jobs, chunksize=4)
    for rows, report in results:
        image_rows.extend(rows)
        report_rows.append(report)
        bar.update()
    bar.close()
    if workers != 1:
        pool.shutdown()
    reports = pd.DataFrame(report_rows)
    splits = assign_splits(list(reports.patient_id), list(reports.diagnosis), seed=seed)
    reports["split"] = reports.patient_id.map(splits)
    pd.DataFrame(image_rows).to_csv(out / "images.csv", index=False, lineterminator="\n")
    if not with_diagnosis:
        reports[["patient_id", "diagnosis"]].to_csv(out / "diagnosis_truth.csv", index=False, lineterminator="\n")
        reports = reports.drop(columns=["diagnosis"])
    reports.to_csv(out / "reports.csv", index=False, lineterminator="\n")
    return out
