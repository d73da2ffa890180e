"""Benchmark 7: a scale rehearsal of the cache-mode data path at the real cohort's size (issue 15).

    python benchmarks/bench_scale.py            # 1/20 size: 750 patients, 30,000 images (~3 minutes on 2 cores)
    python benchmarks/bench_scale.py --full     # 15,000 patients, 600,000 images (3.1 GB of features)

What runs, all of it the package's real code on a synthetic cohort:

1. a cohort table (patients with 1-90 images, ~40 on average, nm/px log-uniform 2-100, a report and a diagnosis of
   the bundled renal classes each) and one 1-byte placeholder file per image: the cache key stats every image and
   the cohort check needs a non-empty file, nothing ever decodes them;
2. a feature cache in the real on-disk format (``emclip.train.cache``: two rank shards of random float32 features
   of the trunk's width, a manifest with sizes and SHA-256), under the key the run computes, so training finds it;
3. the start-up checks side by side (interleaved): the previous way, which every rank ran (check every image
   file, stat every image for the key, SHA-256 of every cache file), against the main process's checks now (the
   same minus the hashes: sizes and identities against the manifest) and the other ranks' (read the tables, map
   the shards);
4. ``python -m emclip.train demo`` (cache mode, the default head) for one epoch with 1 process and with 2
   (``torch.distributed.run --standalone``, the launcher the tests use): each rank's start-up (``train()`` entered
   to its first step), epoch time and peak RSS (memory-mapped pages of the cache count in it and are shared);
5. embedding every patient with the trained run (``evaluation.runs.embed_run``) in 1 process and sharded over 2
   (checked equal), then the full evaluation protocol (``evaluation.report.evaluate``) on the embeddings.

The text tower's features are built once (timed) before the runs, as the main process builds them.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchutil  # first: sets the OpenMP wait policy before torch loads (inherited by the child processes)
from benchutil import MB, PeakRSS, interleave, median, paired_ratio, print_result, ratio, result
import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent


def cohort_tables(n_patients: int, mean_images: int, max_images: int, seed: int = 0):
    """(images, reports) tables: bag sizes 1-``max_images`` with mean ``mean_images`` exactly."""
    from emclip.evaluation.zeroshot import load_prompts
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.rint(rng.gamma(4.0, mean_images / 4.0, n_patients)), 1, max_images).astype(int)
    target = mean_images * n_patients
    while sizes.sum() != target:          # nudge random bags by one image until the total is exact
        i = rng.integers(n_patients)
        step = 1 if sizes.sum() < target else -1
        if 1 <= sizes[i] + step <= max_images:
            sizes[i] += step
    classes = load_prompts("renal_em").classes
    pids = [f"P{i:05d}" for i in range(n_patients)]
    dx = [classes[i] for i in rng.integers(len(classes), size=n_patients)]
    split = rng.choice(["train", "val", "test"], size=n_patients, p=[0.7, 0.15, 0.15])
    reports = pd.DataFrame({"patient_id": pids, "split": split, "diagnosis": dx,
                            "report": [f"Case {p}: electron microscopy findings consistent with {d}; "
                                       f"{rng.integers(3, 40)} glomeruli examined." for p, d in zip(pids, dx)]})
    owner = np.repeat(np.arange(n_patients), sizes)
    within = np.concatenate([np.arange(s) for s in sizes])
    images = pd.DataFrame({"patient_id": np.array(pids)[owner],
                           "path": [f"images/{pids[o]}/{k:02d}.tif" for o, k in zip(owner, within)],
                           "nm_per_pixel": np.exp(rng.uniform(np.log(2), np.log(100), len(owner))).round(3)})
    return images, reports


def write_cohort(root: Path, images: pd.DataFrame, reports: pd.DataFrame) -> None:
    root.mkdir(parents=True)
    images.to_csv(root / "images.csv", index=False)
    reports.to_csv(root / "reports.csv", index=False)
    for pid in reports.patient_id:
        (root / "images" / pid).mkdir(parents=True)
    for path in images.path:      # placeholders: stat-able, non-empty, never decoded in cache mode
        with open(root / path, "wb") as fh:
            fh.write(b"\0")


def write_feature_cache(model, cohort, cache_dir: Path, shards: int, seed: int = 0, chunk: int = 20_000) -> Path:
    """Random features in the real format: ``shards`` rank shards sealed and listed in a manifest."""
    from emclip.data import ImageTransform
    from emclip.train import cache as fc
    transform = ImageTransform.from_preprocess(model.preprocess, "resize")
    key = fc.cache_key(model.trunk_id, transform, cohort, "dtype", "gray")
    folder = cache_dir / key
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n, dim = len(cohort.images), model.num_features
    records = []
    for rank, (start, stop) in enumerate(fc.shard_bounds(n, shards)):
        feats, zooms = fc.open_shard(folder, rank, stop - start, dim)
        for lo in range(0, stop - start, chunk):          # bounded memory at 600,000 x 1280
            hi = min(lo + chunk, stop - start)
            feats[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        zooms[:] = rng.uniform(0.5, 8.0, stop - start).astype(np.float32)
        feats.flush()
        zooms.flush()
        del feats, zooms
        records.append(fc.seal_shard(folder, rank, start, stop))
    fc.write_manifest(folder, records, {"key": key, "trunk": model.trunk_id, "n_images": n, "dim": dim,
                                        "preprocess": model.preprocess, "policy": "resize", "intensity": "dtype",
                                        "color": "gray", "synthetic": True})
    return folder


def startup_checks(cfg, model, folder: Path, rounds: int) -> dict:
    """Seconds of the start-up checks, interleaved: previous (every rank) vs now (main / other ranks)."""
    from emclip.data import ImageTransform
    from emclip.digests import file_sha256
    from emclip.train import cache as fc
    from emclip.train.runinfo import load_run_cohort
    transform = ImageTransform.from_preprocess(model.preprocess, "resize")

    def previous():   # what each rank did at every start before issue 15
        cohort = load_run_cohort(cfg)                                   # check every image file
        key = fc.cache_key(model.trunk_id, transform, cohort, "dtype", "gray")   # stat every image
        for f in sorted(folder.glob("*_rank*.npy")):                   # hash every cache file
            file_sha256(f)
        return key

    def main_now():   # the same checks of the image files, the cache by sizes and identities against the manifest
        cohort = load_run_cohort(cfg)
        key = fc.cache_key(model.trunk_id, transform, cohort, "dtype", "gray")
        ok, why = fc.check_cache(folder, key, len(cohort.images))
        assert ok, why
        return key

    def other_now():   # the cohort arrives from the main process (a pickle), the shards are mapped
        pickle.loads(pickle.dumps(cohort))
        return fc.open_cache(folder)

    cohort = load_run_cohort(cfg)
    times = interleave({"previous (every rank)": previous, "now: main process": main_now,
                        "now: other ranks": other_now}, rounds=rounds, warmup=0)   # warm: files written just now
    stats = {}
    for name, f in (("read the tables (resolves every path)", lambda: load_run_cohort(cfg, check_images="none")),
                    ("stat every image (cache key)",
                     lambda: fc.cache_key(model.trunk_id, transform, cohort, "dtype", "gray")),
                    ("hash every cache file", lambda: [file_sha256(f) for f in folder.glob("*_rank*.npy")])):
        t0 = time.perf_counter()
        f()
        stats[name] = time.perf_counter() - t0
    return {"times": times, "parts": stats}


def train_run(args: list[str], processes: int, env: dict) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "emclip.train", *args]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "emclip.train", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=benchutil.ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training with {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def embed_worker(run_dir: str, out: str, batch_size: int) -> None:
    """One rank of the sharded embedding (``--embed-worker``): times ``embed_run`` and saves rank 0's result."""
    from accelerate import Accelerator
    from emclip.evaluation.runs import embed_run
    acc = Accelerator(cpu=True)
    t0 = time.perf_counter()
    emb = embed_run(run_dir, batch_size=batch_size, accelerator=acc)
    seconds = time.perf_counter() - t0
    import resource
    Path(out, f"embed_rank{acc.process_index}.json").write_text(json.dumps(
        {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    if emb is not None:
        emb.save(Path(out) / "embeddings_2.npz")
    acc.wait_for_everyone()


def run(n_patients: int = 750, mean_images: int = 40, max_images: int = 90, processes=(1, 2), rounds: int = 2,
        params: str = "demo", model: str | None = None, batch_size: int = 32, n_boot: int = 100,
        embed_batch_size: int = 32, sharded_embed: bool = False, keep: str | None = None) -> dict:
    from emclip.evaluation import Embeddings
    from emclip.evaluation.report import evaluate
    from emclip.evaluation.runs import embed_run, load_run_model, prompt_classes
    from emclip.train import load_config
    from emclip.train.loop import build_run_model
    from emclip.train.runinfo import load_run_cohort
    from emclip.train.text_cache import TextFeatures

    tmp = tempfile.TemporaryDirectory(prefix="bench_scale_") if keep is None else None
    root = Path(keep or tmp.name)
    data, cache = root / "cohort", root / "cache"
    overrides = dict(data_dir=str(data), cache_dir=str(cache), epochs=1, batch_size=batch_size,
                     checkpoint_every=10 ** 6, **({"model": model} if model else {}))
    cfg = load_config(params, dict(overrides, run_dir=str(root / "runs" / "p1")))
    rows, notes, config = [], [], dict(n_patients=n_patients, mean_images=mean_images, max_images=max_images,
                                       processes=list(processes), params=params, model=cfg.model,
                                       batch_size=batch_size)
    timed = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timed[name] = time.perf_counter() - t0
        return out

    images, reports = cohort_tables(n_patients, mean_images, max_images)
    stage("cohort tables + placeholder files", lambda: write_cohort(data, images, reports))
    net = build_run_model(cfg)
    cohort = load_run_cohort(cfg)
    folder = stage("synthetic feature cache (2 shards, hashed)", lambda: write_feature_cache(net, cohort, cache, 2))
    feature_bytes = sum(f.stat().st_size for f in folder.glob("features_rank*.npy"))
    stage("text features, once (main process)", lambda: TextFeatures.build(net, cohort, cfg.eval_batch_size,
                                                                            cfg.cache_path, log=lambda *_: None))
    checks = startup_checks(cfg, net, folder, rounds)
    ct = checks["times"]
    for name in ct:
        rows.append(["start-up checks", name, median(ct[name]), "", ""])
    for name, secs in checks["parts"].items():
        rows.append(["start-up checks", f"of which: {name}", secs, "", ""])
    for name, secs in timed.items():
        rows.append(["setup", name, secs, "", ""])

    env = dict(os.environ, TQDM_DISABLE="1")
    summaries = {}
    for w in processes:
        run_dir = root / "runs" / f"p{w}"
        args = [params] + [f"{k}={v}" for k, v in dict(overrides, run_dir=str(run_dir)).items()]
        wall, _ = train_run(args, w, env)
        summary = json.loads((run_dir / "train_summary.json").read_text())
        summaries[w] = summary
        for r in summary["ranks"]:
            rows.append([f"train, {w} process(es)", f"rank {r['rank']}: setup to first step / epoch",
                         r["startup_seconds"], r["epoch_seconds"][0] if r["epoch_seconds"] else float("nan"),
                         r["peak_rss_mb"]])
            rows.append([f"train, {w} process(es)", f"rank {r['rank']}: process start (imports) to first step",
                         r["process_startup_seconds"], "", ""])
        rows.append([f"train, {w} process(es)", f"whole command ({summary['steps']} steps)", wall, "", ""])

    run1 = root / "runs" / f"p{processes[0]}"
    model_1, cfg_1 = load_run_model(run1)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        emb = embed_run(run1, batch_size=embed_batch_size, model=model_1, cfg=cfg_1, cohort=cohort)
        t_embed = time.perf_counter() - t0
    rows.append(["embed", "embed_run, 1 process", t_embed, "", mem.peak / MB])
    equal = None
    if sharded_embed:
        out = root / "embed2"
        out.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(HERE / "bench_scale.py"), "--embed-worker", str(run1), str(out),
                               str(embed_batch_size)], capture_output=True, text=True, env=env, cwd=benchutil.ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"sharded embedding failed:\n{proc.stderr[-3000:]}")
        for r in (0, 1):
            rec = json.loads((out / f"embed_rank{r}.json").read_text())
            rows.append(["embed", f"embed_run sharded, 2 processes: rank {r}", rec["seconds"], "",
                         rec["peak_rss_mb"]])
        rows.append(["embed", "embed_run sharded, 2 processes: whole command", wall, "", ""])
        two = Embeddings.load(out / "embeddings_2.npz")
        equal = bool(np.array_equal(two.patient_ids, emb.patient_ids)
                     and np.array_equal(two.image_patient, emb.image_patient))
        diff = max(float(np.abs(two.patient - emb.patient).max()), float(np.abs(two.image - emb.image).max()))
        notes.append(f"sharded embedding vs 1 process: same patients and image rows: {equal}; largest difference "
                     f"{diff:.2g} (1 thread per rank vs 2: float rounding only)")
    with PeakRSS() as mem, torch.no_grad():
        t0 = time.perf_counter()
        evaluate(emb, model_1.encode_text, model_1.logit_scale, root / "eval", classes=prompt_classes(cohort),
                 split="test", n_boot=n_boot, figures=False, name="scale")
        t_eval = time.perf_counter() - t0
    rows.append(["evaluate", f"evaluation protocol on the embeddings (n_boot {n_boot}, no figures)", t_eval, "",
                 mem.peak / MB])

    prev, main_now, other_now = (ct[k] for k in ("previous (every rank)", "now: main process", "now: other ranks"))
    ratios = [
        ratio("startup_checks_previous_over_main", paired_ratio(ct, "previous (every rank)", "now: main process"),
              meaning="start-up checks of one rank before / of the main process now (hashes replaced by "
                      "size + identity against the manifest)"),
        ratio("startup_checks_previous_over_other_ranks",
              paired_ratio(ct, "previous (every rank)", "now: other ranks"),
              meaning="before / the other ranks now (they read the tables and map the shards)"),
    ]
    for w, s in summaries.items():
        ranks = s["ranks"]
        ratios.append(ratio(f"train_{w}p_startup_s", max(r["startup_seconds"] for r in ranks),
                            meaning=f"{w} process(es): slowest rank's setup (cohort, caches, model, loaders) "
                                    f"to its first step, seconds"))
        ratios.append(ratio(f"train_{w}p_process_startup_s", max(r["process_startup_seconds"] for r in ranks),
                            meaning=f"{w} process(es): slowest rank's process start (imports included) to its "
                                    f"first step, seconds"))
        ratios.append(ratio(f"train_{w}p_epoch_s", max(r["epoch_seconds"][0] for r in ranks),
                            meaning=f"{w} process(es): one epoch incl. validation and checkpoint, seconds"))
        ratios.append(ratio(f"train_{w}p_peak_rss_mb", max(r["peak_rss_mb"] for r in ranks),
                            meaning=f"{w} process(es): largest peak RSS of a rank, MB (mapped cache pages included)"))
    ratios += [ratio("embed_s", t_embed, meaning="embed_run, 1 process, seconds"),
               ratio("evaluate_s", t_eval, meaning="evaluation protocol on the embeddings, seconds")]
    if equal is not None:
        ratios.append(ratio("sharded_embedding_equal", float(equal), target="== 1", met=equal,
                            meaning="2-process embedding has the 1-process patients and image rows"))
    n_img = len(images)
    notes += [f"{n_patients:,} patients, {n_img:,} images ({n_img / n_patients:.1f} per patient, max "
              f"{int(images.patient_id.value_counts().max())}); features {feature_bytes / 2 ** 30:.2f} GiB in 2 shards",
              "previous: per rank, every start; now: the main process once per start, broadcast to the others",
              f"start-up check medians: previous {median(prev):.2f} s, main {median(main_now):.2f} s, other ranks "
              f"{median(other_now):.2f} s ({rounds} interleaved rounds)"]
    if tmp is not None:
        tmp.cleanup()
    res = result("scale", f"7. Scale rehearsal: {n_patients:,} patients, {n_img:,} images (cache mode)",
                 ["stage", "what", "seconds", "epoch seconds", "peak RSS MB"], rows, ratios, notes, config)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="15,000 patients, 600,000 images")
    ap.add_argument("--patients", type=int, default=750)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sharded-embed", action="store_true", help="also embed sharded over 2 processes (+~80 s)")
    ap.add_argument("--batch-size", type=int, default=32, help="patients per process per step")
    ap.add_argument("--model", default=None, help="model config (default: the parameter set's)")
    ap.add_argument("--keep", default=None, help="work in this (new) folder and keep it")
    ap.add_argument("--embed-worker", nargs=3, metavar=("RUN", "OUT", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.embed_worker:
        embed_worker(args.embed_worker[0], args.embed_worker[1], int(args.embed_worker[2]))
        return 0
    res = run(n_patients=15_000 if args.full else args.patients, processes=tuple(args.processes),
              rounds=args.rounds, model=args.model, keep=args.keep,
              batch_size=args.batch_size, sharded_embed=args.sharded_embed)
    print_result(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
