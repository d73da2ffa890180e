"""The training loop, on accelerate: one process or many, CPU or GPUs, resumable at any step.

Read top to bottom: ``train(cfg)`` sets up data, model, optimizer and schedule; ``_Trainer.step`` does one optimizer
step (with gradient accumulation that keeps every negative); validation computes the contrastive loss over the whole
validation split at once, so that it is comparable between runs whatever the batch size.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..data import BagDataset, ImageTransform, collate_bags
from ..loss import ClipLoss, SigLipLoss
from ..model import build_model
from ..metrics import recall_at_k
from ..progress import bars_disabled
from .cache import build_feature_cache
from .checkpoint import (copy_as, find_checkpoint, latest_checkpoint, load_checkpoint, prepare_resume, save_checkpoint,
                         write_text_atomic)
from .config import TrainConfig
from .collective import all_gather_objects, main_first
from .runinfo import check_resume, ensure_cohort, run_lock, write_run_info
from .text_cache import TextFeatures


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / a notebook's interrupt: one line saying where training stopped and that running again resumes (no
    traceback in IPython, which renders ``_render_traceback_`` instead)."""

    def __init__(self, step: int, last: Path | None):
        where = f"from {last.name}, the last checkpoint" if last is not None else "from the start (no checkpoint yet)"
        super().__init__(f"interrupted at step {step}; run again to resume ({where})")
        self.step, self.last = step, last

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


class EpochSampler(Sampler):
    """A permutation of the dataset that depends only on (seed, epoch): resuming replays the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self):
        return self.n


def build_run_model(cfg: TrainConfig):
    """The model a run trains, initialised from ``cfg.seed`` (so a random trunk is the same in every process and in
    the feature cache's key)."""
    set_seed(cfg.seed)
    return build_model(cfg.model, **cfg.model_overrides())


def cosine_with_warmup(warmup: int, total: int):
    """LambdaLR factor: linear warmup (step + 1) / warmup, then cosine to 0 at ``total`` (open_clip_train's cosine_lr).

    Kept by hand: transformers' get_cosine_schedule_with_warmup warms up from 0 (step / warmup: the first step
    would not train) and rises again past ``total``; torch's SequentialLR(LinearLR, CosineAnnealingLR) gives the same
    values but another scheduler state, so every saved checkpoint (LambdaLR state) would need converting."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, gains and the temperature (open_clip's convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Trainer:
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, model, text: TextFeatures | None):
        self.cfg, self.acc, self.model, self.text = cfg, accelerator, model, text
        self.loss_fn = SigLipLoss() if cfg.loss == "siglip" else ClipLoss()
        self.raw = accelerator.unwrap_model(model)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(patient, report) embeddings of one micro-batch, through the (possibly DDP-wrapped) model."""
        if self.text is not None:
            batch = dict(batch, text_features=self.text.lookup(batch["patient_ids"]).to(self.acc.device))
        out = self.model(batch, instances=False)   # the loss needs the bags only: pool before the projection
        return out["patient"], out["report"]

    def loss(self, patient, report) -> torch.Tensor:
        scale = self.raw.logit_scale.exp()
        if self.cfg.loss == "siglip":
            return self.loss_fn(patient, report, scale, self.raw.logit_bias)
        return self.loss_fn(patient, report, scale)

    def step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over ``accum_freq`` micro-batches, keeping all their negatives.

        As open_clip's accum-freq: embed every micro-batch without gradient, then recompute each one with
        gradient and take the loss of the concatenation in which only that micro-batch carries gradient.
        """
        if len(micro_batches) == 1:
            patient, report = self.forward(micro_batches[0])
            loss = self.loss(patient, report)
            self.acc.backward(loss)
            return self._mean_over_processes(loss)
        with torch.no_grad():
            cached = [self.forward(mb) for mb in micro_batches]
        for j, mb in enumerate(micro_batches):
            sync = j == len(micro_batches) - 1
            ctx = self.acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx:
                patient_j, report_j = self.forward(mb)
                patients = torch.cat([patient_j if i == j else c[0] for i, c in enumerate(cached)])
                reports = torch.cat([report_j if i == j else c[1] for i, c in enumerate(cached)])
                loss = self.loss(patients, reports)
                self.acc.backward(loss)   # summed over j this is the gradient of the full-batch loss
        return self._mean_over_processes(loss)

    def _mean_over_processes(self, loss: torch.Tensor) -> float:
        """Each process holds the loss of its own rows against all columns; their mean is the global loss."""
        return float(self.acc.reduce(loss.detach().clone(), "mean"))

    @torch.no_grad()
    def validate(self, loader) -> tuple[float, float]:
        """(contrastive loss, mean patient<->report Recall@1/5/10) over the whole validation split as one batch.

        One batch whatever the batch size, so both are comparable across runs. The recall is label-free and tracks
        what the study reports far better than the loss, which bottoms out epochs before zero-shot stops improving
        (BRIEF section 5)."""
        self.model.eval()
        patients, reports = [], []
        for batch in loader:
            p, r = self.forward(batch)
            p, r = self.acc.gather_for_metrics((p.contiguous(), r.contiguous()))
            patients.append(p)
            reports.append(r)
        self.model.train()
        patients, reports = torch.cat(patients), torch.cat(reports)
        # world_size=1: the embeddings are already gathered, so no process may gather them again
        scale = self.raw.logit_scale.exp()
        if self.cfg.loss == "siglip":
            loss = float(SigLipLoss(world_size=1)(patients, reports, scale, self.raw.logit_bias))
        else:
            loss = float(ClipLoss(world_size=1)(patients, reports, scale))
        return loss, mean_recall(patients.float() @ reports.float().T)


def mean_recall(sim: torch.Tensor, ks=(1, 5, 10)) -> float:
    """Mean over both directions and ``ks`` of Recall@k, the true match on the diagonal (ties count against)."""
    match = torch.arange(len(sim))[:, None]
    values = [r for s in (sim, sim.T) for r in recall_at_k(s, match, ks, ties="pessimistic").values()]
    return sum(values) / len(values)


def _datasets(cfg: TrainConfig, cohort, model, accelerator, log):
    if cfg.mode == "cache":
        cache = build_feature_cache(model, cohort, cfg.cache_path, accelerator, batch_size=cfg.eval_batch_size,
                                    num_workers=cfg.num_workers, log=log)
        make = lambda split, k: BagDataset(cohort, split, features=cache.features, feature_zoom=cache.zoom,  # noqa
                                           max_instances=k, seed=cfg.seed)
    else:
        transform = ImageTransform.from_preprocess(model.preprocess)
        make = lambda split, k: BagDataset(cohort, split, transform=transform, max_instances=k, seed=cfg.seed)  # noqa
    return make("train", cfg.max_instances), make("val", None)


def train(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) the run in ``cfg.run_dir``; returns a summary with the best validation loss.

    Before anything is written, the main process locks the run folder (``run_dir/.lock``: a second trainer on it
    fails at once), checks that a run already there was trained with a compatible configuration
    (``runinfo.check_resume``), and picks the newest intact checkpoint to resume from (damaged ones are set aside,
    saying so; ``best/`` is re-created when a kill left it behind)."""
    run = cfg.run_path
    # accelerate's TensorBoard tracker writes run/tensorboard when tensorboard is installed (asked for without it,
    # accelerate warns on every run); the CSV log always exists
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.precision, project_dir=str(run),
                              log_with="tensorboard" if is_tensorboard_available() else None)
    say = log if accelerator.is_main_process else (lambda *_: None)
    ckpt_root = run / "checkpoints"
    with contextlib.ExitStack() as held:
        def claim_run_dir() -> str | None:
            run.mkdir(parents=True, exist_ok=True)
            held.enter_context(run_lock(run))
            found = find_checkpoint(ckpt_root)                      # reads only
            check_resume(run, cfg, found[0], accelerator.num_processes)
            resume = prepare_resume(ckpt_root, say, found)          # the first write
            return None if resume is None else resume.name

        resume = _main_first(accelerator, claim_run_dir)
        return _train(cfg, accelerator, say, run, ckpt_root, None if resume is None else ckpt_root / resume)


def _since_process_start() -> float | None:
    """Seconds since this process started (imports included), from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/stat") as fh:
            started = int(fh.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def _main_first(accelerator, fn):
    return main_first(accelerator, fn, "could not start the run")


def _load_cohort(cfg: TrainConfig, accelerator, say):
    """The cohort, loaded and its image files checked (exist, not empty) by the main process only and sent to the
    others: reading the tables resolves every image path (~5 s per 30,000 images here), checking them stats every
    file, and neither needs doing once per process (a 600,000-image cohort pickles to ~60 MB)."""
    return main_first(accelerator, lambda: ensure_cohort(cfg, None, say), "could not load the cohort")


def _train(cfg: TrainConfig, accelerator: Accelerator, say, run: Path, ckpt_root: Path, resume: Path | None) -> dict:
    is_main = accelerator.is_main_process
    entered = time.perf_counter()
    cohort = _load_cohort(cfg, accelerator, say)
    model = build_run_model(cfg)
    model.to(accelerator.device)
    train_ds, val_ds = _datasets(cfg, cohort, model, accelerator, say)
    text = (TextFeatures.build(model, cohort, cfg.eval_batch_size, cfg.cache_path, log=say, accelerator=accelerator)
            if cfg.lock_text else None)
    global_batch = cfg.batch_size * accelerator.num_processes
    if len(train_ds) < global_batch * cfg.accum_freq:
        raise ValueError(f"the train split has {len(train_ds)} patients, fewer than one step needs "
                         f"(batch_size {cfg.batch_size} x {accelerator.num_processes} processes x accum_freq "
                         f"{cfg.accum_freq}); lower batch_size")
    if is_main:   # after the checks above: a run refused before it started leaves no config.json to compare with
        write_run_info(run, cfg, model, cohort)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    # cached features arrive packed (only real rows, no padded copy for encode_bags to gather back); images padded
    collate = functools.partial(collate_bags, padded=False)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              collate_fn=collate, num_workers=cfg.num_workers)
    val_loader = DataLoader(val_ds, batch_size=cfg.eval_batch_size, collate_fn=collate,
                            num_workers=cfg.num_workers)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(train_ds) // global_batch // cfg.accum_freq
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, total_steps))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    trainer = _Trainer(cfg, accelerator, model, text)

    step, start_epoch, skip, best, best_score, best_step = 0, 0, 0, math.inf, -math.inf, None
    if resume is not None:   # the newest intact checkpoint, verified by the main process (claim_run_dir)
        meta = load_checkpoint(resume, trainer.raw, optimizer, scheduler, verify=False)
        step, start_epoch, skip = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        best = meta.get("best_val_loss", math.inf)
        best_score = meta.get("best_score", -math.inf)
        best_step = meta.get("best_step")
        say(f"resuming {run} from {resume.name} (epoch {start_epoch}, step {step})")
    log_path = run / "metrics_log.csv"
    fields = ["step", "epoch", "loss", "lr", "logit_scale", "val_loss", "val_recall", "seconds"]
    if is_main:
        if resume is None or not log_path.exists():
            with open(log_path, "w", newline="") as fh:
                csv.writer(fh).writerow(fields)
        else:
            _truncate_log(log_path, fields, step)
    accelerator.init_trackers("tensorboard")
    start = time.perf_counter()
    done = step >= total_steps or (cfg.max_steps is not None and step >= cfg.max_steps)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {run.name}", unit="step",
               disable=not is_main or bars_disabled())

    def checkpoint(epoch: int, batch_in_epoch: int, val_loss: float | None = None, is_best: bool = False):
        accelerator.wait_for_everyone()
        if is_main:
            meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_val_loss": best,
                    "best_score": best_score, "best_step": best_step, "is_best": is_best, "val_loss": val_loss,
                    "processes": accelerator.num_processes, "config": cfg.to_dict()}
            return save_checkpoint(ckpt_root, trainer.raw, optimizer, scheduler, meta)
        return None

    postfix: dict[str, str] = {}
    startup = process_startup = None   # this process's own timings, gathered into the summary
    epoch_seconds = []
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if done:
                break
            epoch_start = time.perf_counter()
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_loader, skip * cfg.accum_freq) if skip else train_loader
            if hasattr(loader, "set_epoch"):   # accelerate's loaders re-seed the sampler from their own epoch counter
                loader.set_epoch(epoch)
            batch_in_epoch, micro = skip, []
            skip = 0
            for batch in loader:
                micro.append(batch)
                if len(micro) < cfg.accum_freq:
                    continue
                if startup is None:   # everything before the first step: cohort, caches, model, loaders
                    startup, process_startup = time.perf_counter() - entered, _since_process_start()
                loss = trainer.step(micro)
                micro = []
                if not math.isfinite(loss):
                    last = latest_checkpoint(ckpt_root)
                    raise TrainingDiverged(f"loss is {loss} at step {step + 1} (epoch {epoch}); stopped without saving. "
                                           f"Last good checkpoint: {last or 'none'}. Lower lr or check the inputs.")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                trainer.raw.clamp_logit_scale()
                step += 1
                batch_in_epoch += 1
                bar.update()
                if is_main:
                    row = [step, epoch, round(loss, 6), scheduler.get_last_lr()[0],
                           round(float(trainer.raw.logit_scale.detach().exp()), 4), "", "",
                           round(time.perf_counter() - start, 2)]
                    _append(log_path, row)
                    accelerator.log({"loss": loss, "lr": row[3], "logit_scale": row[4]}, step=step)
                    postfix["loss"] = f"{loss:.3f}"
                    bar.set_postfix(postfix)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    done = True
                    break
                if step % cfg.checkpoint_every == 0 and batch_in_epoch < steps_per_epoch:
                    checkpoint(epoch, batch_in_epoch)
            if done and batch_in_epoch < steps_per_epoch:
                checkpoint(epoch, batch_in_epoch)
                break
            val_loss, val_recall = trainer.validate(val_loader)
            score = val_recall if cfg.select_on == "val_recall" else -val_loss
            improved = score > best_score
            best, best_score = min(best, val_loss), max(best_score, score)
            if is_main:
                _append(log_path, [step, epoch, "", "", "", round(val_loss, 6), round(val_recall, 6),
                                   round(time.perf_counter() - start, 2)])
                accelerator.log({"val_loss": val_loss, "val_recall": val_recall}, step=step)
                postfix.update(epoch=f"{epoch + 1}/{cfg.epochs}", val_loss=f"{val_loss:.4f}",
                               val_recall=f"{val_recall:.3f}" + ("*" if improved else ""))
                bar.set_postfix(postfix)   # per-epoch values live in the bar; a log line only where no bar shows
                if bar.disable:
                    say(f"epoch {epoch + 1}/{cfg.epochs}: step {step}, val loss {val_loss:.4f}, val recall "
                        f"{val_recall:.3f}" + (f" (best {cfg.select_on})" if improved else ""))
            if improved:
                best_step = step
            # the step records itself as best and is not pruned until best/ holds it: a kill before copy_as loses
            # nothing (resuming re-creates best/, evaluation finds the step)
            path = checkpoint(epoch + 1, 0, val_loss, is_best=improved)
            if is_main and improved:
                copy_as(ckpt_root, path, "best")
            epoch_seconds.append(round(time.perf_counter() - epoch_start, 3))
    except KeyboardInterrupt:
        bar.close()
        last = latest_checkpoint(ckpt_root) if is_main else None
        raise TrainingInterrupted(step, last) from None
    bar.close()
    accelerator.wait_for_everyone()
    # ru_maxrss: KiB on Linux; memory-mapped cache pages read count in it (shared between the processes of a node)
    ranks = all_gather_objects(accelerator, {
        "rank": accelerator.process_index, "startup_seconds": None if startup is None else round(startup, 3),
        "process_startup_seconds": None if process_startup is None else round(process_startup, 2),
        "epoch_seconds": epoch_seconds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    summary = {"run_dir": str(run), "steps": step, "best_val_loss": best, "select_on": cfg.select_on,
               "best_score": best_score, "seconds": round(time.perf_counter() - start, 2),
               "processes": accelerator.num_processes, "ranks": ranks}
    if is_main:
        write_text_atomic(run / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    accelerator.end_training()
    return summary


def _append(path: Path, row: list) -> None:
    with open(path, "a", newline="") as fh:
        csv.writer(fh).writerow(row)


def _truncate_log(path: Path, fields: list[str], step: int) -> None:
    """On resume, drop log rows written after the checkpoint resumed from (also after a fallback to an older one),
    so the log matches an uninterrupted run. Replaced atomically: a kill here keeps the old log."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    keep = [fields] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    out = io.StringIO(newline="")
    csv.writer(out).writerows(keep)
    write_text_atomic(path, out.getvalue())
