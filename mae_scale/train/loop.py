"""The pretraining loop: fixed steps on every rank, agreed decisions, checkpoints, metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from mae_scale import hardware
from mae_scale.config import Config
from mae_scale.model.checkpointing import checkpointed_blocks
from mae_scale.train import dist as D
from mae_scale.train.batch import normalize_clips
from mae_scale.train.checkpoint import Checkpointer, resume_source, set_rng_state
from mae_scale.train.engine import PRECISION_DTYPES, Built, clips_per_micro_step, model_kwargs
from mae_scale.train.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from mae_scale.train.summary import FaultTally, closing_summary, fault_stats, format_summary, write_summary

DATA_WAIT_WARNING = 0.3  # share of step time spent waiting for the loader that deserves a warning


class NonFiniteLossError(RuntimeError):
    pass


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 0. Second: exit at once."""

    def __init__(self):
        self.requested = False
        self.name = ""  # of the first signal
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            print(
                f"[mae-scale] second {signal.Signals(signum).name}: exiting now, without a checkpoint",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)  # at once, even inside a collective; the last complete checkpoint stands
        self.requested = True
        self.name = signal.Signals(signum).name
        print(
            f"[mae-scale] {signal.Signals(signum).name}: will checkpoint after this step and exit",
            file=sys.stderr,
            flush=True,
        )

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, built: Built, loader, *, rank: int, world_size: int, resume: str | None) -> dict:
    """Run to cfg.train.steps (or until a stop signal); rank 0 ends by printing the closing summary
    and writing RUN/summary.json, also after a stop or an error. Returns where the run ended."""
    from mae_scale.model.flops import train_step_flops

    began = time.monotonic()
    engine = built.engine
    run_dir = cfg.run_dir
    log = _rank0_print if rank == 0 else (lambda *_: None)
    ckpt = Checkpointer(
        run_dir / "checkpoints", keep=cfg.checkpoint.keep, rank=rank, world_size=world_size, log=log
    )
    start_step, replay_note = 0, ""
    restored, source = None, ckpt
    carried_faults, carried_skips = [], 0  # from the ranks of another world size
    if resume != "none":
        root, tag = resume_source(ckpt.root, resume)
        if root != ckpt.root:  # a checkpoint folder of another run
            source = Checkpointer(root, keep=1, rank=rank, world_size=world_size, log=log)
        restored = source.load(engine, tag)
        if restored is None and source is not ckpt:
            raise FileNotFoundError(f"--resume {resume}: checkpoint not usable (see the messages above)")
    if restored is not None:
        tag, state = restored
        start_step = int(engine.global_steps)
        if "other_world" in state or not loader.fits(state["loader"]):  # other ranks, workers or buffer
            rank_states = state.get("other_world") or source.rank_states(tag)
            old = [s["loader"] for s in rank_states]
            carried_faults = [s.get("stats", {}) for s in old]  # the loader starts its counts afresh
            carried_skips = max(int(s.get("skipped_steps", 0)) for s in rank_states)
            policy = cfg.checkpoint.reshard_data
            if policy == "exact":  # the unfinished epochs continue on the new streams, every sample once
                loader.load_elastic(old)
                before, now = old[0].get("workers"), loader.spec.workers
                workers = f"; {before} -> {now} workers per rank" if before != now else ""
                replay_note = f"data stream continues exactly ({len(old)} -> {world_size} ranks{workers})"
            else:
                epoch = loader.load_nearest_safe_point(old, policy=policy)
                what = {
                    "replay": "what the old run saw of it is replayed, nothing is skipped",
                    "skip": "the unseen rest of earlier epochs is skipped, nothing is repeated",
                }[policy]
                replay_note = (
                    f"world size {len(old)} -> {world_size}: data stream restarts at the start of epoch "
                    f"{epoch} (checkpoint.reshard_data={policy}: {what})"
                )
        else:
            loader.load_state_dict(state["loader"])
            replay_note = "data stream continues exactly"
    dtype = PRECISION_DTYPES[built.precision]
    peak, peak_source = device_peak_tflops(built.precision, cfg.log.peak_tflops)
    flops_per_clip = train_step_flops(model_kwargs(cfg), batch_size=1, mask_ratio=cfg.model.mask_ratio)
    metrics = MetricsLogger(
        run_dir,
        cfg.to_dict(),
        enabled=rank == 0,
        wandb_mode=cfg.log.wandb,
        project=cfg.log.wandb_project,
        total_steps=cfg.train.steps,
        start_step=start_step,
        resumed=restored is not None,
    )
    if restored is not None:
        metrics.info(
            f"[mae-scale] resumed from {source.root / restored[0]} at step {start_step}: {replay_note}"
        )
    metrics.info(
        f"[mae-scale] attention={engine.module.attention_backend()} precision={built.precision} "
        f"zero_stage={engine.zero_optimization_stage()} ranks={world_size} "
        f"clips/step={built.clips_per_step} peak_lr={built.peak_lr:.3g} "
        f"peak={peak:.1f} TFLOP/s ({peak_source})"
    )
    if start_step >= cfg.train.steps:
        metrics.info(
            f"[mae-scale] {run_dir} is already at train.steps={cfg.train.steps}: nothing to do "
            "(raise train.steps to train further)"
        )
    params_total, params_local = parameter_partition(engine.module)
    weights_l2 = math.sqrt(D.all_reduce_sum([local_sum_of_squares(engine.module)])[0])
    metrics.log(
        start_step,
        {
            "event": "start",
            "params_total": params_total,
            "params_per_rank": D.all_gather_object(params_local),
            "clips_per_step": built.clips_per_step,
            "flops_per_clip": flops_per_clip,  # training FLOPs (3 x forward): what TFLOP/s and MFU count
            "grad_accum": cfg.train.grad_accum,
            "weights_l2": weights_l2,
            "zero_stage": engine.zero_optimization_stage(),
            "precision": built.precision,
            "attention": engine.module.attention_backend(),
            "checkpointed_blocks": len(checkpointed_blocks(engine.module)),
            "world_size": world_size,
            "hardware": hardware.report(),  # which machine (CPU flags, accelerator answers) ran this
        },
    )
    faults = FaultTally(carried_faults)
    faults.update(D.gather_object(fault_stats(loader.stats())))  # restored counts: named before
    sample_log = (
        open(run_dir / f"samples_rank{rank}.jsonl", "a", buffering=1) if cfg.log.sample_keys else None
    )

    config_yaml = cfg.to_yaml()
    stop = StopSignal()
    stop_agreed = False
    step = start_step
    window = _Window()
    last_save_time = time.monotonic()
    consecutive_nonfinite = 0
    skipped_total = int(restored[1].get("skipped_steps", carried_skips)) if restored is not None else 0
    micro_clips = clips_per_micro_step(cfg)
    it = iter(loader)
    # The RNG streams last, right before the first step: everything above (the peak-FLOP/s probe, the
    # loader's start) may draw random numbers, and a resumed run must draw exactly what the straight one did.
    if restored is not None and "rng" in restored[1]:
        set_rng_state(restored[1]["rng"])
    elif restored is not None:  # another world size: the old ranks' streams do not map to ours
        D.seed_everything(cfg.seed, rank, start_step)
    stopped_by_signal = False
    last_clips = last_keys = last_row = newest_checkpoint = picture = curves = curves_step = None
    segment = _Window()  # the metrics of every step of this run segment, for the closing summary
    ended = "error"
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            batch = next(it)
            t_data = time.perf_counter() - t0
            last_clips, last_keys = batch["clips"], batch["keys"]
            clips = normalize_clips(batch["clips"], cfg.data.mean, cfg.data.std, dtype)
            loss, _, _ = engine(clips)
            loss_value = loss.item()  # syncs: needed to agree on skipping a non-finite step before backward
            finite = math.isfinite(loss_value)
            minutes_due = (
                cfg.checkpoint.every_minutes > 0
                and rank == 0
                and time.monotonic() - last_save_time > 60 * cfg.checkpoint.every_minutes
            )
            loss_sum, nonfinite, stops, time_due = D.all_reduce_sum(
                [
                    loss_value if finite else 0.0,
                    0.0 if finite else 1.0,
                    float(stop.requested),
                    float(minutes_due),
                ]
            )
            # Decide only on the agreed value: a signal landing on one rank after this all-reduce must
            # wait for the next one, or that rank would checkpoint while the others train on (a hang).
            stop_agreed = stop_agreed or stops > 0
            if sample_log is not None:
                sample_log.write(
                    json.dumps({"step": step, "keys": batch["keys"], "skipped": nonfinite > 0}) + "\n"
                )
            if nonfinite > 0:  # every rank skips together: no backward, no optimizer step
                consecutive_nonfinite += 1
                skipped_total += 1
                metrics.info(
                    f"[mae-scale] step {step}: non-finite loss on {int(nonfinite)} rank(s); batch skipped"
                )
                if consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{consecutive_nonfinite} consecutive non-finite losses at step {step}: "
                        "stopping (lower optim.base_lr or check the data)"
                    )
                continue
            consecutive_nonfinite = 0
            engine.backward(loss)
            engine.step()
            window.add(loss_sum / world_size, t_data, micro_clips)
            segment.add(loss_sum / world_size, t_data, micro_clips)
            if int(engine.global_steps) == step:  # inside an accumulation window
                continue
            step = int(engine.global_steps)
            metrics.advance()
            if step % cfg.log.every_steps == 0 or step == cfg.train.steps:
                # the tally feeds what rank 0 logs: the other ranks' counts go to rank 0 alone
                for line in faults.update(D.gather_object(fault_stats(loader.stats()))):
                    metrics.info(line)
                summary = window.summary(engine, world_size, flops_per_clip, peak, skipped_total, faults)
                metrics.log(step, summary)
                last_row = summary
                if summary["data_wait_frac"] > DATA_WAIT_WARNING and step > cfg.log.every_steps:
                    metrics.info(
                        f"[mae-scale] step {step}: {summary['data_wait_frac']:.0%} of the time waiting for "
                        f"data; the loader is the bottleneck (raise data.workers={cfg.data.workers} "
                        "or data.repeats)"
                    )
                window = _Window()
            if cfg.log.image_every_steps and step % cfg.log.image_every_steps == 0:
                from mae_scale.viz import save_training_reconstruction

                save_training_reconstruction(
                    cfg,
                    built,
                    batch["clips"],
                    batch["keys"],
                    step,
                    rank=rank,
                    path=run_dir / "images" / f"step_{step:08d}.png",
                )
            due = (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or time_due > 0
            if stop_agreed or step == cfg.train.steps or due:
                path = ckpt.save(
                    engine,
                    step,
                    {"loader": loader.state_dict(), "skipped_steps": skipped_total},
                    config_yaml=config_yaml,
                )
                last_save_time = time.monotonic()
                newest_checkpoint = path
                metrics.info(f"[mae-scale] checkpoint saved: {path}")
                if rank == 0:
                    curves, curves_step = draw_curves(run_dir, metrics.info), step
            if stop_agreed:
                stopped_by_signal = True
                metrics.info(
                    f"[mae-scale] stopped by signal at step {step}; resume with the same command "
                    f"(checkpoint: {run_dir / 'checkpoints'})"
                )
                break
        ended = f"stopped by {stop.name or 'a signal to another rank'}" if stopped_by_signal else "finished"
        if last_clips is not None and not stopped_by_signal:
            from mae_scale.viz import save_training_reconstruction

            picture = save_training_reconstruction(cfg, built, last_clips, last_keys, step, rank=rank)
    except BaseException as exc:
        ended = f"error: {type(exc).__name__}: {exc}"
        raise
    finally:
        stop.restore()
        if sample_log is not None:
            sample_log.close()
        metrics.close()
        if rank == 0:  # local facts only: after an error the other ranks may be gone
            if curves is None or curves_step != step:  # rows logged since the last checkpoint's drawing
                curves = draw_curves(run_dir, _rank0_print)
            newest_checkpoint = newest_checkpoint or _latest_checkpoint(ckpt)
            report = closing_summary(
                run_dir=run_dir,
                ended=ended,
                start_step=start_step,
                step=step,
                target_steps=cfg.train.steps,
                wall_s=time.monotonic() - began,
                segment=segment.summary(engine, world_size, flops_per_clip, peak, skipped_total, faults)
                if segment.losses
                else None,
                last_row=last_row,
                skipped_steps=skipped_total,
                faults=faults,
                checkpoint=str(newest_checkpoint) if newest_checkpoint else None,
                pictures={"reconstruction": picture, "curves": curves},
            )
            write_summary(run_dir, report)
            _rank0_print(format_summary(report))
    return {
        "step": step,
        "stopped_by_signal": stopped_by_signal,
        "skipped_steps": skipped_total,
        "start_step": start_step,
    }


def parameter_partition(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters in the model, parameters this rank holds): ZeRO-3 keeps ~1/world of them per rank."""
    total = local = 0
    for p in model.parameters():
        total += getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return total, local


@torch.no_grad()
def local_sum_of_squares(model: torch.nn.Module) -> float:
    """This rank's share of sum(w^2): under ZeRO-3 its partitions (padding is zeros), else all weights
    on rank 0 only; summed over ranks it fingerprints the weights (logged at start, checked on resume)."""
    total = 0.0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.double().pow(2).sum().item()
        elif D.is_main():
            total += p.double().pow(2).sum().item()
    return total


class _Window:
    """Accumulates what happened between two metric logs."""

    def __init__(self):
        self.t_start = time.perf_counter()
        self.losses: list[float] = []
        self.data_wait = 0.0
        self.clips = 0

    def add(self, loss: float, data_wait: float, clips: int) -> None:
        self.losses.append(loss)
        self.data_wait += data_wait
        self.clips += clips

    def summary(
        self, engine, world_size: int, flops_per_clip: float, peak: float, skipped: int, faults: FaultTally
    ) -> dict:
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        tflops = flops_per_clip * self.clips / elapsed / 1e12  # per device: clips counted on this rank
        grad_norm = engine.get_global_grad_norm()
        return {
            "loss": sum(self.losses) / max(1, len(self.losses)),
            "lr": engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "clips_per_s": self.clips * world_size / elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops / peak if peak > 0 else None,
            "data_wait_frac": self.data_wait / elapsed,
            "peak_mem_gb": peak_memory_gb(),
            "skipped_steps": skipped,
            "bad_samples": faults.total,  # all ranks, since the run's start
            "bad_by_reason": dict(faults.by_reason),
        }


def draw_curves(run_dir, log) -> Path | None:
    """RUN/metrics.png from metrics.jsonl; a failure to draw is reported, never allowed to stop a run."""
    from mae_scale.plots import plot_runs

    try:
        return plot_runs([run_dir], run_dir / "metrics.png")
    except Exception as exc:  # noqa: BLE001 - a picture is not worth a run
        log(f"[mae-scale] metrics.png not drawn: {type(exc).__name__}: {exc}")
        return None


def _latest_checkpoint(ckpt: Checkpointer) -> Path | None:
    found = ckpt.peek()
    return ckpt.root / found[0] if found else None


def _rank0_print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
