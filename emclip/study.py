"""The scale study: ``python -m emclip.study [PARAMS]`` (default ``study``, ``make study``).

Three stages, every choice made on the validation split, the test split read only at the end:

1. **Hyper-parameters** (the ``hp_search`` section, e.g. ``lr: [...]``): the default variant's aware and blind arms,
   seed 0, one run per value; the value with the best mean validation zero-shot balanced accuracy of the two arms
   is kept for every arm (the same for both, so the choice cannot favour one).
2. **Grid** (the ``ablations`` section): every arm x seed trains with those values and is evaluated on val and test.
3. **Default**: the variant (scale mode x aggregator) whose aware arm has the best mean validation zero-shot balanced
   accuracy over seeds; its paired aware - blind differences on test are the study's headline.

Runs are resumable: a finished arm (``train_summary.json`` and both evaluations present) is not trained again.
``study: {workers: N}`` runs N arms side by side, one thread each (on 2 cores, 2 workers are ~2x faster than one
run on 2 threads: small feature-cache runs are bound by Python overhead, not arithmetic).
Outputs: ``reports/<name>/study.md``, ``study.json``, ``study.png`` and, for the committed summary,
``reports/summary/<name>/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from . import ablation
from .paths import project_root, resolve
from .evaluation.cached import evaluate_run
from .paramsets import load_params
from .train.config import load_config
from .train.loop import train


def _train_and_evaluate(job: tuple) -> float:
    """Train (or resume) one arm and evaluate it on val and test; returns the seconds spent. A module-level function
    of one tuple, so a process pool can run it."""
    params, arm, run, n_boot, topj, extra, threads = job
    start = time.perf_counter()
    if threads:   # a worker process: one thread, and no progress bars interleaved with the other workers'
        import sys

        import torch
        torch.set_num_threads(threads)
        sys.stderr = open(os.devnull, "w")
    cfg = load_config(params, {**arm.overrides(), **extra, "run_dir": str(run)})
    train(cfg, log=lambda *a: None)
    # validation only needs the point estimates that select; test gets the full bootstrap
    evaluate_run(run, split="val", n_boot=min(n_boot, 200), topj=topj, figures=False, name="eval_val")
    evaluate_run(run, split="test", n_boot=n_boot, topj=topj, figures=False)
    seconds = time.perf_counter() - start
    (run / "study_seconds.json").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    return seconds


def _recorded_seconds(run: Path) -> float:
    """The training + evaluation time recorded when a finished run was made (0 when not recorded)."""
    path = run / "study_seconds.json"
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0


def _finished(run: Path) -> bool:
    return all((run / f).exists() for f in ("train_summary.json", "eval/metrics.json", "eval_val/metrics.json"))


def _run_jobs(jobs: list[tuple], workers: int, log, trained: list) -> list[float]:
    """Run (params, arm, run, ...) jobs, ``workers`` at a time; finished runs are skipped (resume) and the number
    trained is added to ``trained[0]``."""
    todo = [j for j in jobs if not _finished(j[2])]
    trained[0] += len(todo)
    seconds = {str(j[2]): _recorded_seconds(j[2]) for j in jobs if _finished(j[2])}
    for j in jobs:
        if _finished(j[2]):
            log(f"  {j[1].name}: already done")
    if workers <= 1:
        for j in todo:
            seconds[str(j[2])] = _train_and_evaluate(j)
            log(f"  {j[1].name}: {seconds[str(j[2])]:.0f} s")
    elif todo:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_train_and_evaluate, j[:-1] + (1,)): j for j in todo}
            for f in as_completed(futures):
                j = futures[f]
                seconds[str(j[2])] = f.result()
                log(f"  {j[1].name}: {seconds[str(j[2])]:.0f} s ({sum(str(t[2]) in seconds for t in todo)}/"
                    f"{len(todo)} done)")
    return [seconds[str(j[2])] for j in jobs]


def _prepare_shared(params: str, seeds, log) -> None:
    """Generate the cohort and build the feature and text caches once, here, before worker processes share them
    (two workers building the same cache at once would race). Random trunks differ by seed, so each seed's trunk
    gets its cache; a pretrained trunk is one cache for all."""
    from .train.cache import build_feature_cache
    from .train.loop import build_run_model
    from .train.runinfo import ensure_cohort
    from .train.text_cache import TextFeatures
    cohort = None
    for seed in sorted(set(seeds)):
        cfg = load_config(params, {"seed": seed})
        cohort = cohort if cohort is not None else ensure_cohort(cfg, log=log)
        model = build_run_model(cfg)
        if cfg.mode == "cache":
            build_feature_cache(model, cohort, cfg.cache_path, batch_size=cfg.eval_batch_size,
                                num_workers=cfg.num_workers, log=log)
        if cfg.lock_text:
            TextFeatures.build(model, cohort, cfg.eval_batch_size, cfg.cache_path)


def _val_score(run: Path) -> float:
    m = json.loads((run / "eval_val" / "metrics.json").read_text())
    return m["zero_shot"]["patient"]["balanced_accuracy"]["value"]


def run_study(params: str = "study", log=print, runs_root: str | Path | None = None, out: str | Path | None = None,
              summary_dir: str | Path | None = None) -> Path:
    """Run the three stages; runs go to ``runs/<name>``, the report to ``reports/<name>`` and a copy of it to
    ``reports/summary/<name>`` unless other folders are given."""
    P = load_params(params)
    name, base = P.name, P.train
    n_boot, topj, workers = P.evaluation.bootstrap, P.evaluation.topj, P.study.workers
    root = Path(runs_root) if runs_root else resolve(f"runs/{name}")
    out = Path(out) if out else project_root() / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    default_arm = ablation.Arm(base.scale_mode, base.aggregator, True, base.seed, base.scale_attention)
    timings, start, trained = {}, time.perf_counter(), [0]

    arms = ablation.grid(P.ablations, base.to_dict())
    _prepare_shared(params, [base.seed] + [a.seed for a in arms], log)

    # 1. hyper-parameters on validation
    chosen, hp_rows = {}, []
    for key, values in P.hp_search.items():
        log(f"hyper-parameter {key}: {values} (validation, {default_arm.variant}, seed {base.seed})")
        pair = (default_arm, default_arm.partner())
        jobs = [(params, arm, root / "hp" / f"{key}={value}" / arm.name, n_boot, topj, {**chosen, key: value}, 0)
                for value in values for arm in pair]
        for job, sec in zip(jobs, _run_jobs(jobs, workers, log, trained)):
            timings[f"hp {job[2].parent.name} {job[1].name}"] = sec
            hp_rows.append({"parameter": key, "value": job[5][key], "arm": job[1].group,
                            "val bal. acc.": _val_score(job[2])})
        scores = {v: sum(r["val bal. acc."] for r in hp_rows if r["parameter"] == key and r["value"] == v) / 2
                  for v in values}
        chosen[key] = max(scores, key=scores.get)
        log(f"  chosen {key}={chosen[key]} (mean validation balanced accuracy {scores[chosen[key]]:.3f})")

    # 2. the grid
    log(f"grid: {len(arms)} runs")
    runs = {arm: root / arm.name for arm in arms}
    jobs = [(params, arm, runs[arm], n_boot, topj, chosen, 0) for arm in arms]
    for arm, sec in zip(arms, _run_jobs(jobs, workers, log, trained)):
        timings[arm.name] = sec
    runs = ablation.runs_by_arm(runs.values())   # each arm as its run's config.json records it
    if set(runs) != set(arms):
        raise ValueError(f"the runs in {root} were trained as other arms than the grid's: "
                         f"{sorted(a.name for a in set(runs) ^ set(arms))}")

    # 3. the default variant, chosen on validation
    val = pd.DataFrame([{"variant": a.variant, "scale": "aware" if a.scale_embed else "blind", "seed": a.seed,
                         "val bal. acc.": _val_score(r)} for a, r in runs.items()])
    val_means = val.groupby(["variant", "scale"])["val bal. acc."].mean().unstack()
    default_variant = val_means["aware"].idxmax()
    log(f"default variant on validation: {default_variant}")

    total = _accumulate_wall_time(root, time.perf_counter() - start, trained=trained[0] > 0)
    table = ablation.run_table(runs)
    diffs = ablation.paired_differences(runs, n_boot=n_boot)
    summary = ablation.seed_summary(table)
    cost = ablation.pair_confusion_cost(runs)
    write_report(out, name, table, summary, diffs, val_means, pd.DataFrame(hp_rows), chosen, default_variant,
                 timings, total, cost)
    ablation.ablation_figure(table, diffs, default_variant, out / "study.png")
    dest = Path(summary_dir) if summary_dir else project_root() / "reports" / "summary" / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("study.md", "study.json", "study.png"):
        shutil.copy2(out / f, dest / f)
    log(f"study done in {total / 60:.1f} min: {out / 'study.md'} (summary copied to {dest})")
    return out


def _accumulate_wall_time(root: Path, seconds: float, trained: bool) -> float:
    """Wall time of the study summed over the invocations that trained runs (a resumed study adds its own; a
    report-only invocation adds nothing), kept in ``<runs>/study_wall_time.json``."""
    path = root / "study_wall_time.json"
    total = float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0
    if trained:
        total += seconds
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seconds": round(total, 1)}) + "\n")
    return total


def headline(diffs: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The pooled-over-seeds paired differences of one variant."""
    rows = diffs[(diffs.variant == variant) & (diffs.seed == "pooled")]
    return rows[["metric", "aware", "blind", "aware − blind", "95% CI", "p(diff ≤ 0)", "patients"]]


def write_report(out: Path, name: str, table, summary, diffs, val_means, hp, chosen, default_variant, timings,
                 total, cost=None) -> None:
    head = headline(diffs, default_variant)
    md = [f"# Scale study `{name}`: does the scale embedding help?", "",
          f"Default variant (best validation zero-shot balanced accuracy of the aware arm): **{default_variant}**.",
          f"Hyper-parameters chosen on validation: {chosen or 'none searched'}. Wall time {total / 60:.1f} min "
          f"(training and evaluating {len(table)} grid runs and {len(hp)} search runs, summed over the invocations "
          f"that trained; per-run times in study.json).", "",
          "## Headline: scale-aware − scale-blind on the test patients (default variant, pooled over seeds)", "",
          head.round(3).to_markdown(index=False), "",
          "## What the pairs can add",  "",
          "Balanced accuracy (10 classes) each arm loses to within-pair confusions (a twin predicted as its partner), "
          "mean and sd over seeds: the most that resolving the confusable pairs, and nothing else, could add.", "",
          cost.round(3).to_markdown() if cost is not None else "", "",
          "## Every variant, pooled over seeds", "",
          diffs[diffs.seed == "pooled"].drop(columns=["seed", "ci_low", "ci_high"]).round(3).to_markdown(index=False),
          "", "## Per arm: mean ± sd over seeds (test split)", "", summary.to_markdown(), "",
          "## Per run (arms x seeds, test split)", "", table.round(3).to_markdown(), "",
          "## Per seed paired differences", "",
          diffs[diffs.seed != "pooled"].drop(columns=["ci_low", "ci_high"]).round(3).to_markdown(index=False), "",
          "## Selection on the validation split", "", "Zero-shot balanced accuracy, mean over seeds:", "",
          val_means.round(3).to_markdown(), ""]
    if len(hp):
        md += ["Hyper-parameter search (seed 0, default variant):", "",
               hp.astype({"value": str}).round(3).to_markdown(index=False), ""]
    (out / "study.md").write_text("\n".join(md))
    record = {"name": name, "default_variant": default_variant, "chosen_hyperparameters": chosen,
              "wall_time_seconds": round(total, 1), "headline": json.loads(head.to_json(orient="records")),
              "paired_differences": json.loads(diffs.to_json(orient="records")),
              "per_run": json.loads(table.reset_index().to_json(orient="records")),
              "validation": json.loads(val_means.reset_index().to_json(orient="records")),
              "hp_search": json.loads(hp.to_json(orient="records")) if len(hp) else [],
              "pair_confusion_cost": json.loads(cost.reset_index().to_json(orient="records")) if cost is not None
              else [],
              "timings_seconds": {k: round(v, 1) for k, v in timings.items()}}
    (out / "study.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("params", nargs="?", default="study", help="parameter set (params/NAME.yaml), default study")
    args = parser.parse_args(argv)
    run_study(args.params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
