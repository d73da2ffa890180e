"""A trained model applied to a cohort of new patients, as ``notebooks/06_inference.ipynb`` shows it: the parameter
set's ``inference:`` section (which cohort, which text query), that cohort (generated when it is the set's own demo
cohort), the training patients to place the new ones among, and the tables a reader looks at.

Everything that computes something about the model (embeddings, zero-shot, search) is :mod:`emclip.api`; this
module only chooses inputs and shapes outputs for reading.
"""
from __future__ import annotations

import contextlib
import shlex
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..evaluation.settings import from_section
from ..paths import project_root, resolve

__all__ = ["InferenceConfig", "inference_cohort", "scale_warnings", "training_embeddings", "overview",
           "pooling_sentence", "example_patients", "prediction_view", "class_counts", "hits_view", "command_lines",
           "relative_path"]

DEFAULT_QUERY = "randomly oriented non-branching fibrils measuring 8-10 nm in diameter expand the mesangium"


@dataclass(frozen=True)
class InferenceConfig:
    """A parameter set's ``inference:`` section: the cohort of new patients 06 applies the model to, and how that
    cohort is generated when it is the set's own demo cohort (like ``train.generate_*``: only a missing or empty
    folder is ever generated into, and only when no ``data_dir`` was named by the user)."""
    data_dir: str | None = None        # the cohort of new patients; None: 06 needs its data_dir parameter
    generate_cohort: bool = True       # a missing data_dir may be generated (another seed, no diagnosis column)
    generate_patients: int = 60
    generate_image_size: int = 256
    data_seed: int = 1                 # the generated cohort's seed: another one than the training cohort's
    query: str = DEFAULT_QUERY         # the text query 06 searches the new cohort with
    k: int = 5                         # hits shown per search

    def __post_init__(self):
        problems = []
        if self.data_dir is not None and (not isinstance(self.data_dir, str) or not self.data_dir.strip()):
            problems.append(f"data_dir must be a folder path or null, got {self.data_dir!r}")
        if not isinstance(self.generate_cohort, bool):
            problems.append(f"generate_cohort must be true or false, got {self.generate_cohort!r}")
        for name, low in (("generate_patients", 1), ("generate_image_size", 32), ("data_seed", 0), ("k", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.query, str) or not self.query.strip():
            problems.append(f"query must be a non-empty text, got {self.query!r}")
        if problems:
            raise ValueError("invalid inference settings: " + "; ".join(problems))

    @property
    def data_path(self) -> Path | None:
        return None if self.data_dir is None else resolve(self.data_dir)

    @classmethod
    def from_section(cls, section: dict | None, where: str = "inference") -> "InferenceConfig":
        return from_section(cls, section, where)


def _has_tables(path: Path) -> bool:
    return (path / "images.csv").is_file() or (path / "images.parquet").is_file()


def inference_cohort(settings: InferenceConfig, data_dir: str | Path | None = None, log=print) -> Path:
    """The cohort of new patients: ``data_dir`` when given (a folder the user names is read, never generated into
    or written to), else the set's own ``settings.data_dir``, generated there when it does not exist yet (or is an
    empty folder) and ``settings.generate_cohort`` allows it: ``generate_patients`` synthetic patients of seed
    ``data_seed`` with no diagnosis column, as a new archive would come. The generated folder appears whole (it is
    written beside and renamed into place)."""
    if data_dir is not None:
        path = resolve(data_dir)
        if not _has_tables(path):
            raise FileNotFoundError(f"data_dir {path} has no images.csv (or images.parquet): a cohort to apply a "
                                    f"model to needs at least that table (README: the data contract)")
        return path
    path = settings.data_path
    if path is None:
        raise ValueError("the parameter set names no cohort of new patients (inference.data_dir): give the notebook "
                         "a data_dir, or add an inference: section with data_dir to the set")
    if _has_tables(path):
        return path
    empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
    if not (settings.generate_cohort and empty):
        why = "it is not empty, so nothing is generated into it" if not empty else "inference.generate_cohort is off"
        raise FileNotFoundError(f"inference.data_dir {path} has no images.csv: {why}. Check the path, or write the "
                                f"tables (README: the data contract)")
    from ..synthetic import generate_cohort
    log(f"{path} does not exist: generating a cohort of new patients there ({settings.generate_patients} patients, "
        f"seed {settings.data_seed}, no diagnosis column)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        generate_cohort(tmp, settings.generate_patients, seed=settings.data_seed,
                        image_size=settings.generate_image_size, with_diagnosis=False, progress=False)
        if path.exists():
            path.rmdir()          # empty (checked above): a folder is replaced by rename only when empty
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@contextlib.contextmanager
def scale_warnings():
    """Collect the :class:`~emclip.api.ScaleRangeWarning` messages raised inside the block (images the model sees
    at a scale its training never covered) into the yielded list, once each, as text to show: a report prints no
    Python warning. Any other warning goes on as it would have."""
    from ..api import ScaleRangeWarning
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScaleRangeWarning)
        yield notes
    for w in caught:
        if issubclass(w.category, ScaleRangeWarning):
            if str(w.message) not in notes:
                notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def training_embeddings(trained, progress: bool = False):
    """The training cohort's patients embedded by ``trained`` itself (so the map and the new patients share one
    space whatever happened to the run since its evaluation; in cache mode the run's feature cache is reused), or
    None for an exported model folder, which carries no cohort. The cohort's validation and test images outside
    the train split's scale range are expected, not news: that warning is not raised here."""
    if trained.kind != "run":
        return None
    from ..api import ScaleRangeWarning
    from ..train.runinfo import load_run_cohort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScaleRangeWarning)
        return trained.embed(load_run_cohort(trained.config), progress=progress)


def overview(trained, cohort) -> str:
    """Markdown for a reader: which model (where from, classes, the scale range its training images covered) and
    which cohort (patients, images, nm/px, what its reports give), paths relative to the project."""
    root = project_root()
    lo_hi = ("an unknown scale range" if trained.scale_range_nm is None else
             "images of {:.3g}-{:.3g} nm/px as the model sees them".format(*trained.scale_range_nm))
    what = "a run folder" if trained.kind == "run" else "an exported model folder"
    model = (f"**Model** `{relative_path(trained.source, root)}` ({what}): {len(trained.prompts.classes)} zero-shot "
             f"classes, embeddings of width {trained.model.embed_dim}, trained on {lo_hi}.")
    images, reports = cohort.images, cohort.reports
    source = reports.diagnosis_source.value_counts()
    if source.get("given", 0):
        dx = f"{source['given']} patients have a diagnosis in the cohort's own table"
    elif source.get("labeler", 0):
        dx = (f"no diagnosis column; the report labeler read one from {source['labeler']} of {len(reports)} "
              f"reports (shown beside the prediction as a cross-check, not as a ground truth)")
    else:
        dx = "no diagnosis for any patient"
    has_reports = int((reports.report.astype(str).str.len() > 0).sum())
    new = (f"**New cohort** `{relative_path(cohort.root, root)}`: {len(reports)} patients, {len(images)} images "
           f"of {images.nm_per_pixel.min():.3g}-{images.nm_per_pixel.max():.3g} nm/px, {has_reports} with a report; "
           f"{dx}.")
    return model + "\n\n" + new


def pooling_sentence(model) -> str:
    """How the model's aggregator weighs a patient's images, in one sentence for a reader."""
    from ..model.aggregators import GatedAttentionPool, MeanPool
    pool = model.aggregator
    if isinstance(pool, MeanPool):
        return ("This model pools by **mean**: every image of a patient weighs the same, so no image is attended "
                "more than another and the images shown are simply the first of each patient.")
    what = "gated attention" if isinstance(pool, GatedAttentionPool) else "a transformer's attention"
    return (f"This model pools by **{what}**: each image gets a weight (they sum to 1 per patient), and the patient's "
            f"embedding leans on the images with the highest weights.")


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` when it lies inside it (what a reader of a report needs), else as given."""
    try:
        return Path(path).relative_to(Path(root)).as_posix()
    except ValueError:
        return str(path)


def prediction_view(table: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """The predictions table as a reader scans it, one row per patient (the index): the diagnosis when the cohort
    has one, the predicted class and its probability (raw and prior-corrected), the images and their nm/px range,
    and the most attended image relative to the cohort folder. Every class's probability stays in the CSV."""
    out = pd.DataFrame(index=pd.Index(table.patient_id.to_numpy(), name="patient"))
    if "diagnosis" in table:
        out["diagnosis (cohort)"] = table.diagnosis.fillna("").to_numpy()
    for key, label in (("patient", "predicted"), ("prior_corrected", "prior-corrected")):
        pred = table[f"{key}_pred"]
        out[label] = pred.to_numpy()
        out[f"p({label})"] = [round(float(table.at[i, f"{key}_p[{c}]"]), 3) for i, c in zip(table.index, pred)]
    out["images"] = table.n_images.to_numpy()
    out["min nm/px"] = table.nm_per_pixel_min.map(lambda v: f"{v:.3g}").to_numpy()
    out["max nm/px"] = table.nm_per_pixel_max.map(lambda v: f"{v:.3g}").to_numpy()
    out["most attended image"] = [relative_path(p, root) for p in table.most_attended_image]
    return out


def example_patients(table: pd.DataFrame, n: int = 3, min_images: int = 2) -> list[str]:
    """``n`` patients to look at closely: the most confident prediction of each predicted class in turn (most
    confident classes first), so that the examples differ; patients with at least ``min_images`` images come
    first (a bag of one image has nothing to weigh). Fewer when the cohort has fewer patients."""
    confidence = [table.at[i, f"patient_p[{c}]"] for i, c in zip(table.index, table.patient_pred)]
    ranked = table.assign(confidence=confidence, small=table.n_images < min_images)
    ranked = ranked.sort_values(["small", "confidence"], ascending=[True, False], kind="stable")
    chosen = list(ranked.drop_duplicates("patient_pred").patient_id[:n])
    chosen += [p for p in ranked.patient_id if p not in chosen][:n - len(chosen)]
    return chosen


def class_counts(table: pd.DataFrame, classes) -> pd.DataFrame:
    """Patients per class: predicted (raw), prior-corrected, and the cohort's own diagnosis when it has one."""
    counts = {"predicted": table.patient_pred, "prior-corrected": table.prior_corrected_pred}
    if "diagnosis" in table:
        counts["diagnosis (cohort)"] = table.diagnosis
    out = pd.DataFrame({name: col.value_counts().reindex(list(classes), fill_value=0)
                        for name, col in counts.items()})
    out.index.name = "class"
    return out


def hits_view(hits: pd.DataFrame, root: str | Path, predictions: pd.DataFrame | None = None) -> pd.DataFrame:
    """Search hits as a reader scans them, by rank: score, patient (with its predicted class when ``predictions``
    are given, and its diagnosis when the cohort has one), and for image hits the image relative to the cohort
    folder and its nm/px."""
    out = pd.DataFrame({"score": hits["score"].round(3).to_numpy(), "patient": hits["patient_id"].to_numpy()},
                       index=pd.Index(hits["rank"].to_numpy(), name="rank"))
    if predictions is not None:
        out["predicted"] = out.patient.map(dict(zip(predictions.patient_id, predictions.patient_pred)))
    if "diagnosis" in hits and (hits["diagnosis"].fillna("") != "").any():
        out["diagnosis (cohort)"] = hits["diagnosis"].fillna("").to_numpy()
    if "path" in hits:
        out["image"] = [relative_path(p, root) for p in hits["path"]]
        out["nm/px"] = hits["nm_per_pixel"].map(lambda v: f"{v:.3g}").to_numpy()
    return out


def command_lines(model: str | Path, cohort: str | Path, query: str, patient: str, k: int) -> str:
    """Markdown: the commands that do what 06 does, with this notebook's model, cohort and query (paths relative to
    the project when inside it); they write into new paths of their own, never over the notebook's outputs."""
    model, cohort = (shlex.quote(relative_path(p, project_root())) for p in (model, cohort))
    return "\n".join([
        "```bash",
        "# zero-shot diagnosis, one row per patient (the table above)",
        f"python -m emclip.predict {model} {cohort} --out my_predictions.csv",
        "# patient and image embeddings: the index the searches read",
        f"python -m emclip.embed {model} {cohort} --out my_index",
        "# the patients, then the images, closest to a text; the patients closest to one patient",
        f"python -m emclip.search my_index {shlex.quote(query)} -k {k}",
        f"python -m emclip.search my_index {shlex.quote(query)} -k {k} --level image",
        f"python -m emclip.search my_index --patient {shlex.quote(patient)} -k {k}",
        "# a self-contained model folder, which every command above takes in place of the run folder",
        f"python -m emclip.export {model} --out my_model",
        "```"])
