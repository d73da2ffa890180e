"""Ablations: a grid of arms (scale mode x aggregator x scale-aware/blind x seed), their table and paired statistics.

An :class:`Arm` is one training configuration of the grid; its run directory holds ``eval/metrics.json`` and
``eval/predictions.csv`` (``evaluation.cached.evaluate_run``). The tables read only those files, so they can be
rebuilt from finished runs at any time; which arm a run is comes from its ``config.json`` (``runs_by_arm``), never
from its folder name. Every aware arm is paired with the blind arm of the same mode, aggregator and seed: the
blind arm has the same layers without the scale input (``ScaleConditioning``), so a difference is the scale's.

Seeds: each statistic is reported per seed and pooled. The pooled difference is the mean over seeds of
(aware - blind) on the same test patients; its 95% CI resamples patients jointly for every seed and both arms.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .evaluation.pairs import pair_name
from .model.aggregators import DEFAULT_AGGREGATOR
from .model.scale import DEFAULT_SCALE_MODE
from .paramsets import ABLATION_KEYS
from .metrics import balanced_accuracy, bootstrap_difference

HEADLINE = "zero-shot bal. acc."


@dataclass(frozen=True)
class Arm:
    """One run of the grid: the training keys an ablation varies (their defaults are the training defaults)."""
    scale_mode: str = DEFAULT_SCALE_MODE
    aggregator: str = DEFAULT_AGGREGATOR
    scale_embed: bool = True
    seed: int = 0
    scale_attention: bool = False

    # names for tables and folders, derived from the fields (never parsed back: runs record their arm in config.json)
    mode_label = property(lambda self: self.scale_mode + ("+attn" if self.scale_attention else ""),
                          doc="the scale mode, with +attn when the scale also conditions the attention scorer")
    variant = property(lambda self: f"{self.mode_label}-{self.aggregator}",
                       doc="mode and aggregator, without awareness or seed: what an aware arm is compared within")
    group = property(lambda self: f"{self.variant}-{'aware' if self.scale_embed else 'blind'}",
                     doc="the arm without its seed")
    name = property(lambda self: f"{self.group}-s{self.seed}", doc="the arm's run folder name")

    def overrides(self) -> dict:
        return asdict(self)

    def partner(self) -> "Arm":
        """The same arm with the scale input switched (aware <-> blind)."""
        return Arm(self.scale_mode, self.aggregator, not self.scale_embed, self.seed, self.scale_attention)

    @classmethod
    def from_config(cls, config: dict) -> "Arm":
        """The arm a run was trained as, from the fields of its configuration (a run's ``config.json``)."""
        return cls(str(config["scale_mode"]), str(config["aggregator"]), bool(config["scale_embed"]),
                   int(config["seed"]), bool(config.get("scale_attention", False)))


def arm_of(run: str | Path) -> Arm:
    """The arm of a trained run, read from the ``config.json`` training wrote into it: the run folder's name plays
    no part (a renamed or moved run keeps its arm)."""
    return Arm.from_config(json.loads((Path(run) / "config.json").read_text()))


def runs_by_arm(run_dirs) -> dict[Arm, Path]:
    """``{arm: run}`` for trained runs, each arm from its own ``config.json``; two runs of one arm are an error
    (their rows would silently overwrite each other)."""
    runs: dict[Arm, Path] = {}
    for run in map(Path, run_dirs):
        arm = arm_of(run)
        if arm in runs:
            raise ValueError(f"{run} and {runs[arm]} were both trained as arm {arm.name}")
        runs[arm] = run
    return runs


def grid(spec: dict, defaults: dict | None = None) -> list[Arm]:
    """Every arm of an ``ablations`` section: lists under ``scale_mode``, ``aggregator``, ``scale_embed``, ``seeds``,
    ``scale_attention`` (a missing key takes the training default). Attention conditioning is only paired with
    gated attention; other combinations are left out, not refused."""
    defaults = defaults or {}

    def values(key, default_key=None):
        v = spec.get(key, [defaults.get(default_key or key, getattr(Arm, default_key or key))])
        return list(v) if isinstance(v, (list, tuple)) else [v]

    unknown = set(spec) - set(ABLATION_KEYS)
    if unknown:
        raise ValueError(f"unknown ablation key(s) {sorted(unknown)}; known: {', '.join(ABLATION_KEYS)}")
    arms = []
    for mode, agg, attention, seed, aware in itertools.product(
            values("scale_mode"), values("aggregator"), values("scale_attention"), values("seeds", "seed"),
            values("scale_embed")):
        if attention and agg != "gated_attention":
            continue
        arms.append(Arm(str(mode), str(agg), bool(aware), int(seed), bool(attention)))
    return arms


def default_parallel(n_arms: int) -> int:
    """Arms trained at once by default: one per CPU core (at most 8). A cache-mode arm is small-matrix work that a
    second thread barely speeds up, so on 2 cores two single-threaded arms finish sooner than one two-threaded."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_arms, cores, 8))


def train_arms(arms: list[Arm], params: str, report_root: str | Path, runs_root: str | Path,
               parallel: int | None = None, log=print, **parameters) -> list[Path]:
    """Train and evaluate every arm by executing ``03_train`` for it (report in ``report_root/<arm>``, run in
    ``runs_root/<arm>``; finished runs resume to their stored results), ``parallel`` at a time.

    With several at once each kernel gets ``cores // parallel`` threads (``OMP_NUM_THREADS``), so they do not
    oversubscribe the CPU. Every arm is attempted; the first failure is raised after the others finish (a rerun
    resumes what finished). ``parameters`` go to every arm's notebook (``epochs``, ``n_boot``, ``overrides``).
    Returns the run folders in the order of ``arms``."""
    from .reports import execute_notebook
    parallel = default_parallel(len(arms)) if parallel is None else max(1, int(parallel))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cores // parallel))
    env = {k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")} if parallel > 1 else {}
    runs = [Path(runs_root) / arm.name for arm in arms]
    start = time.perf_counter()

    def one(i: int) -> float:
        t0 = time.perf_counter()
        execute_notebook("03_train", Path(report_root) / arms[i].name,
                         dict(params=params, run_dir=str(runs[i]), **parameters, **arms[i].overrides()), env=env)
        seconds = time.perf_counter() - t0
        log(f"[{time.perf_counter() - start:5.0f} s] {arms[i].name} done in {seconds:.0f} s")
        return seconds

    log(f"{len(arms)} arms, {parallel} at a time ({threads} thread(s) each)" if parallel > 1 else
        f"{len(arms)} arms, one at a time")
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(one, i) for i in range(len(arms))]
        errors = [f.exception() for f in futures]
    failed = [(arm, e) for arm, e in zip(arms, errors) if e is not None]
    if failed:
        names = ", ".join(arm.name for arm, _ in failed)
        raise RuntimeError(f"{len(failed)} of {len(arms)} arms failed ({names}); the first error follows, finished "
                           f"arms are kept and a rerun resumes") from failed[0][1]
    return runs


def _fmt_ci(lo, hi) -> str:
    return "" if lo is None or hi is None or np.isnan(lo) or np.isnan(hi) else f"[{lo:.3f}, {hi:.3f}]"


def _metrics(run: Path) -> dict:
    return json.loads((Path(run) / "eval" / "metrics.json").read_text())


def run_table(runs: dict[Arm, Path]) -> pd.DataFrame:
    """One row per run: zero-shot (patient level) AUC and balanced accuracy with CIs, within-pair accuracy and AUC
    of every confusable pair, the MI-Zero top-j baseline, report->patient Recall@1/5 and the linear probe."""
    rows = []
    for arm, run in runs.items():
        m = _metrics(run)
        zs = m["zero_shot"]["patient"]
        row = {"arm": arm.name, "variant": arm.variant, "mode": arm.mode_label, "aggregator": arm.aggregator,
               "scale": "aware" if arm.scale_embed else "blind", "seed": arm.seed,
               "zero-shot AUC": zs["roc_auc_macro_ovr"]["value"],
               "zero-shot AUC 95% CI": _fmt_ci(zs["roc_auc_macro_ovr"]["ci_low"], zs["roc_auc_macro_ovr"]["ci_high"]),
               "zero-shot bal. acc.": zs["balanced_accuracy"]["value"],
               "zero-shot bal. acc. 95% CI": _fmt_ci(zs["balanced_accuracy"]["ci_low"],
                                                     zs["balanced_accuracy"]["ci_high"])}
        for name, block in m["zero_shot"].get("pairs", {}).items():
            short = _short(block["a"], block["b"])
            # a pair without test patients has no metric blocks: NaN, not an error
            row[f"{short} acc."] = block.get("accuracy", {}).get("value", np.nan)
            row[f"{short} AUC"] = block.get("roc_auc", {}).get("value", np.nan)
        for j, block in m["zero_shot"].get("image_topj", {}).items():
            row[f"top-{j} image AUC"] = block["roc_auc_macro_ovr"]["value"]
        r2p = m["retrieval"]["report_to_patient"]["recall"]
        row["report->patient R@1"], row["report->patient R@5"] = r2p["1"]["value"], r2p["5"]["value"]
        probe = m.get("linear_probe", {}).get("test_roc_auc_macro_ovr")
        if probe and probe.get("mean") is not None:  # undefined (null) on a split too small for an AUC
            row["probe AUC (5 seeds)"] = f"{probe['mean']:.3f}" + (f" ± {probe['sd']:.3f}" if probe["sd"] is not None
                                                                   else "")
        else:
            row["probe AUC (5 seeds)"] = "undefined" if probe else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("arm")


def _short(a: str, b: str) -> str:
    """'thin basement membrane nephropathy', 'normal' -> 'thin/normal' (first word of each)."""
    return f"{a.split()[0]}/{b.split()[0]}"


# --- paired statistics --------------------------------------------------------------------------------------------

def _predictions(run: Path) -> pd.DataFrame:
    return pd.read_csv(Path(run) / "eval" / "predictions.csv", keep_default_na=False)


def _statistics(frames: list[pd.DataFrame], classes: list[str], pairs: list[tuple[str, str]]):
    """Per run, callables of patient indices: zero-shot balanced accuracy and within-pair accuracy per pair."""
    index = {c: i for i, c in enumerate(classes)}
    y = frames[0].diagnosis.map(index).to_numpy()
    stats = []
    for f in frames:
        probs = f[[f"patient_p[{c}]" for c in classes]].to_numpy(float)
        pred = probs.argmax(1)
        per = {"zero-shot bal. acc.": lambda idx, pred=pred: balanced_accuracy(y[idx], pred[idx], len(classes))}
        for a, b in pairs:
            ia, ib = index[a], index[b]
            member = (y == ia) | (y == ib)
            correct = np.where(y == ia, probs[:, ia] > probs[:, ib], probs[:, ib] > probs[:, ia])

            def within(idx, member=member, correct=correct):
                keep = member[idx]
                return float(correct[idx][keep].mean()) if keep.any() else float("nan")
            per[f"{_short(a, b)} acc."] = within
        stats.append(per)
    return y, stats


def paired_differences(runs: dict[Arm, Path], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Aware minus blind, on the same test patients, for every variant: per seed and pooled over seeds.

    Metrics: zero-shot balanced accuracy and the within-pair accuracy of every confusable pair. Each row has the
    aware and blind values, the difference, its percentile CI (patients resampled, all seeds and both arms
    together) and p(diff <= 0), the fraction of resamples where the difference is not positive.
    """
    rows = []
    aware_arms = sorted((a for a in runs if a.scale_embed and a.partner() in runs), key=lambda a: (a.variant, a.seed))
    for variant in sorted({a.variant for a in aware_arms}):
        members = [a for a in aware_arms if a.variant == variant]
        frames = [_predictions(runs[a]) for a in members] + [_predictions(runs[a.partner()]) for a in members]
        common = set.intersection(*(set(f.patient_id) for f in frames))
        m = _metrics(runs[members[0]])
        classes = m["classes"]
        # labelled patients only: no diagnosis, or one outside the classes, is excluded here as in metrics.json
        frames = [f[f.patient_id.isin(common) & f.diagnosis.isin(classes)].sort_values("patient_id")
                  .reset_index(drop=True) for f in frames]
        pairs = [(b["a"], b["b"]) for b in m["zero_shot"].get("pairs", {}).values()]
        y, stats = _statistics(frames, classes, pairs)
        n, k = len(y), len(members)
        full = np.arange(n)
        for metric in stats[0]:
            def diff(idx, seeds):
                return np.mean([stats[s][metric](idx) - stats[k + s][metric](idx) for s in seeds])
            for label, seeds in [(f"s{a.seed}", [i]) for i, a in enumerate(members)] + [("pooled", list(range(k)))]:
                # the same seed for every metric and seed set: all resample the same patients
                boot = bootstrap_difference(lambda idx, seeds=seeds: diff(idx, seeds), n, n_boot, seed, alpha)
                lo, hi = boot["ci_low"], boot["ci_high"]
                rows.append({"variant": variant, "seed": label, "metric": metric,
                             "aware": np.mean([stats[s][metric](full) for s in seeds]),
                             "blind": np.mean([stats[k + s][metric](full) for s in seeds]),
                             "aware − blind": diff(full, seeds), "95% CI": _fmt_ci(lo, hi),
                             "ci_low": lo, "ci_high": hi, "p(diff ≤ 0)": boot["p_le_0"], "patients": n})
    return pd.DataFrame(rows)


def pair_confusion_cost(runs: dict[Arm, Path]) -> pd.DataFrame:
    """Balanced accuracy each run loses to within-pair confusions (a twin predicted as its partner): the most that
    resolving the pairs, and nothing else, could add. Mean ± sd over seeds per arm group."""
    rows = []
    for arm, run in runs.items():
        m, f = _metrics(run), _predictions(run)
        f = f[f.diagnosis.isin(m["classes"])]
        partner = {}
        for b in m["zero_shot"].get("pairs", {}).values():
            partner.update({b["a"]: b["b"], b["b"]: b["a"]})
        support = f.diagnosis.value_counts()
        confused = f[f.diagnosis.map(partner).fillna("") == f.patient_pred].diagnosis.value_counts()
        cost = sum(confused[c] / support[c] for c in confused.index) / len(m["classes"])
        rows.append({"mode": arm.mode_label, "aggregator": arm.aggregator,
                     "scale": "aware" if arm.scale_embed else "blind", "bal. acc. lost to pair confusions": cost})
    g = pd.DataFrame(rows).groupby(["mode", "aggregator", "scale"], sort=False)["bal. acc. lost to pair confusions"]
    return pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "seeds": g.size()})


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds of the numeric per-run columns, one row per arm group (mode, aggregator, scale)."""
    numeric = table.select_dtypes("number").drop(columns=["seed"])
    keys = table[["mode", "aggregator", "scale"]]
    grouped = pd.concat([keys, numeric], axis=1).groupby(["mode", "aggregator", "scale"], sort=False)
    mean, sd, n = grouped.mean(), grouped.std(ddof=1), grouped.size()
    out = mean.copy()
    for col in numeric.columns:
        out[col] = [f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}" for m, s in zip(mean[col], sd[col])]
    out.insert(0, "seeds", n)
    return out


def pair_names(runs: dict[Arm, Path]) -> list[str]:
    m = _metrics(next(iter(runs.values())))
    return [pair_name((b["a"], b["b"])) for b in m["zero_shot"].get("pairs", {}).values()]


def ablation_figure(table: pd.DataFrame, diffs: pd.DataFrame, default_variant: str | None = None, path=None):
    """Per variant: zero-shot balanced accuracy and within-pair accuracy, aware vs blind (dots = seeds), and the
    pooled paired differences with their 95% CIs."""
    metrics = list(dict.fromkeys(diffs.metric)) if len(diffs) else [HEADLINE]   # headline first, then the pairs
    variants = sorted(set(table["variant"]))
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 0.5 * len(variants) + 2.2),
                             sharey=True)
    for ax, metric in zip(axes, metrics):
        for i, v in enumerate(variants):
            for scale, color, dy in (("aware", "#c44e52", 0.12), ("blind", "#4c72b0", -0.12)):
                rows = table[(table.variant == v) & (table.scale == scale)]
                ax.scatter(rows[metric], [i + dy] * len(rows), color=color, s=18, alpha=0.8,
                           label=scale if i == 0 else None)
                ax.plot([rows[metric].mean()] * 2, [i + dy - 0.1, i + dy + 0.1], color=color, lw=2)
        ax.set(title=metric + ("\n(within the pair)" if "/" in metric else "\n(10 classes)"), xlabel="test split")
        ax.axhline(variants.index(default_variant), color="0.85", lw=8, zorder=0) if default_variant in variants else None
    axes[0].set_yticks(range(len(variants)), variants, fontsize=8)
    axes[0].legend(fontsize=8, loc="lower right")
    ax = axes[-1]
    pooled = diffs[diffs.seed == "pooled"]
    for j, metric in enumerate(metrics):
        rows = pooled[pooled.metric == metric].set_index("variant").reindex(variants)
        y = [i + 0.25 - 0.5 * j / max(len(metrics) - 1, 1) for i in range(len(variants))]
        ax.errorbar(rows["aware − blind"], y, xerr=[rows["aware − blind"] - rows.ci_low, rows.ci_high
                                                    - rows["aware − blind"]], fmt="o", ms=4, label=metric)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(title="aware − blind, same test patients\n(mean over seeds, 95% CI)", xlabel="difference")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("scale-aware (red) vs scale-blind (blue), dots = seeds, bars = mean"
                 + ("; shaded row = default chosen on validation" if default_variant else ""))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


QUESTION = ("Does giving the model each image's physical scale improve zero-shot diagnosis over the same model "
            "without it (same layers, no scale input), on the same test patients?")
LEGEND = ("Zero-shot on the test split. *bal. acc.*: balanced accuracy (mean recall over diagnoses). *Within-pair "
          "accuracy* (e.g. `thin/normal acc.`): among the test patients of a confusable pair, the fraction whose "
          "true class scores above the other class of the pair. *aware − blind*: the paired difference on the same "
          "patients (mean over seeds); *95% CI* resamples patients; *p(diff ≤ 0)*: the share of resamples in "
          "which the scale-aware arm is not better.")


def conclusion(diffs: pd.DataFrame, metric: str = "zero-shot bal. acc.") -> str:
    """One paragraph from the pooled paired differences: how large, how certain, and what that allows to say."""
    pooled = diffs[(diffs.seed == "pooled") & (diffs.metric == metric)] if len(diffs) else diffs
    if not len(pooled):
        return "The grid has no scale-aware / scale-blind pair, so it cannot answer the question."
    lo, hi = pooled["aware − blind"].min(), pooled["aware − blind"].max()
    above = pooled[pooled.ci_low > 0]
    below = pooled[pooled.ci_high < 0]
    n = int(pooled.patients.max())
    text = (f"Across {len(pooled)} variant(s), scale-aware minus scale-blind {metric} ranges {lo:+.3f} to {hi:+.3f} "
            f"on {n} test patients. ")
    if len(above):
        text += ("The scale helps with a 95% CI above zero for " + ", ".join(
            f"{r.variant} ({r['aware − blind']:+.3f} {r['95% CI']})" for _, r in above.iterrows()) + ". ")
    if len(below):
        text += ("The blind arm is better with a 95% CI below zero for " + ", ".join(
            f"{r.variant} ({r['aware − blind']:+.3f} {r['95% CI']})" for _, r in below.iterrows()) + ". ")
    if not len(above) and not len(below):
        widest = (pooled.ci_high - pooled.ci_low).max() / 2
        text += (f"Every 95% CI contains 0 (half-widths up to {widest:.2f}): this run cannot tell the arms apart; "
                 "more patients or seeds are needed (the scale study in docs/study.md has them).")
    return text


def write_summary(out: str | Path, table: pd.DataFrame, diffs: pd.DataFrame, title: str,
                  note: str | None = None) -> None:
    """``ablation.md`` (readable tables) and ``metrics.json`` (the same numbers) in ``out``: the question, the
    per-run table with CIs, the paired differences, the conclusion and the figure, in that order. ``note`` (e.g.
    where the diagnoses came from, ``summary.label_sentence``) is printed under the question."""
    out = Path(out)
    pooled = diffs[diffs.seed == "pooled"].drop(columns=["seed", "ci_low", "ci_high"]) if len(diffs) else diffs
    md = [f"# {title}", "", f"**Question.** {QUESTION}", ""] + ([note, ""] if note else []) + [LEGEND, "",
          "## Per run (test split)", "", table.round(3).to_markdown(), ""]
    if table.seed.nunique() > 1:
        md += ["## Mean ± sd over seeds", "", seed_summary(table).to_markdown(), ""]
    md += ["## Scale-aware − scale-blind (paired, same test patients)", "",
           pooled.round(3).to_markdown(index=False) if len(pooled) else "(no aware/blind pairs in the grid)", "",
           "## Conclusion", "", conclusion(diffs), ""]
    if (out / "ablation.png").exists():
        md += ["## Figure", "", "![ablation](ablation.png)", ""]
    (out / "ablation.md").write_text("\n".join(md))
    record = {"per_run": json.loads(table.reset_index().to_json(orient="records")),
              "paired_differences": json.loads(diffs.to_json(orient="records"))}
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
