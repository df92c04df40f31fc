"""The supervised training loop (connector alignment, SFT, connector-only tuning).

One optimizer step = `global_batch_size` sequences = micro-batches x DP ranks, run with megatron's
pipeline schedule; LR from the schedule; NaN/inf steps skipped and counted; checkpoints at intervals,
on SIGTERM (Slurm preemption) and at the end; `--resume auto` continues bit-exactly from `latest`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import Counter

import psutil
import torch
import torch.distributed as dist

from engine.config import to_dict
from engine.train import checkpointing as ckpt
from engine.train.flops import device_peak_flops, step_flops, token_stats
from engine.train.metrics import MetricsWriter
from engine.train.optim import build_optimizer, lr_at, set_lr
from engine.train.losses import output_weight, prepare_model
from engine.train.step import forward_backward, nll_loss_factory, summarize_lm


class TooManyBadSteps(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg, resume: str | None = None):
        from engine.model.build import build_for_this_stage
        from engine.parallel.init import initialize
        from engine.parallel.wrap import wrap_ddp

        self.cfg = cfg
        self._stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)  # from the start: a SIGTERM while building is not lost
        if cfg.parallel.virtual_pipeline_model_parallel_size > 1:
            raise NotImplementedError(
                "parallel.virtual_pipeline_model_parallel_size > 1: the model chunks and the interleaved schedule work "
                "(engine.model.build.build_model_chunks, engine.train.step.forward_backward with a list of chunks), "
                "but the trainers, checkpoints and reference model still hold one module; set it to 1")
        self.pg = initialize(cfg.parallel, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.dp_rank, self.dp_size = dist.get_rank(self.pg.dp), dist.get_world_size(self.pg.dp)
        self.num_micro = self.microbatches_per_step()
        self.model = build_for_this_stage(cfg, self.pg)
        prepare_model(self.model, cfg.train.loss_impl)  # fused_linear: the model returns hidden states
        self.ddp = wrap_ddp(self.model, cfg, self.pg)
        self.optimizer = build_optimizer(cfg, [self.ddp])
        self.step = 0
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        self.empty_steps = 0  # steps skipped because no rank had a learned token
        self.skips_carried: dict[str, int] = {}  # data_skipped of the run before its last resume (all DP ranks)
        self._metric_keys = None

        resume_path = self._resume_checkpoint(resume)
        if resume_path is None and cfg.train.init_from:
            meta = ckpt.load_model_only(ckpt.resolve_checkpoint(cfg.train.init_from), self.model, cfg.model,
                                        cfg.train.init_from_allow)
            self._notice(f"initialised from {cfg.train.init_from} (step {meta.get('step', '?')})")
        self.setup_stage(resuming=resume_path is not None)
        data_state = self._restore(resume_path) if resume_path is not None else None
        self.data = self.build_data(data_state)
        self.metrics = MetricsWriter(cfg.train.run_dir, cfg.train.max_steps, start_step=self.step,
                                     enabled=self.rank == 0)
        self._peak_flops = device_peak_flops()

    # ------------------------------------------------------------------ resume
    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"world_size": dist.get_world_size(), "tensor_model_parallel_size": p.tensor_model_parallel_size,
                "pipeline_model_parallel_size": p.pipeline_model_parallel_size}

    def _resume_checkpoint(self, resume: str | None):
        if not resume:
            return None
        ckpt.clean_partial(self.cfg.train.run_dir)
        return ckpt.resume_checkpoint(self.cfg.train.run_dir, resume)

    def _restore(self, path) -> dict | None:
        """Model, optimizer, counters, per-rank state from a checkpoint; returns this rank's data position or None."""
        meta, rank_state = ckpt.load_checkpoint(path, self.model, self.optimizer, self._layout())
        self.step = int(meta["step"])
        counters = meta.get("counters") or rank_state or {}  # older checkpoints kept the counters per rank
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.empty_steps = int(counters.get("empty_steps", 0))
        self.skips_carried = {k: int(v) for k, v in (counters.get("data_skipped") or {}).items()}
        if rank_state is None:
            old = meta.get("layout") or {"world_size": meta.get("world_size")}
            self._notice(f"resumed into another layout ({self._layout()}; checkpoint: {old}): RNG states are not "
                         "restored (this run's seeding), stage state (e.g. a sample buffer) comes from rank 0's file")
            rank_state = ckpt.load_trainer_state(path / "trainer" / "rank00000.pt")
        self.load_extra_state(rank_state.get("extra", {}))
        if meta.get("dp_size") != self.dp_size:
            self._notice(f"resumed at data-parallel size {self.dp_size} (checkpoint: {meta.get('dp_size')}): "
                         "the data order restarts from the beginning of the file")
            return None
        positions = meta.get("data_positions")
        if positions is not None:
            return positions[self.dp_rank]
        return rank_state.get("data")  # older checkpoints: this rank's own file (same layout)

    # ------------------------------------------------------------------ helpers
    def _notice(self, text: str) -> None:
        if self.rank == 0:
            print(f"[engine] {text}", flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def _is_loss_reporter(self) -> bool:
        """Last pipeline stage, TP rank 0: one reporter per DP replica."""
        pp, tp = self.pg.pp, self.pg.tp
        return dist.get_rank(pp) == dist.get_world_size(pp) - 1 and dist.get_rank(tp) == 0

    def _global_sum(self, values: list[float]) -> list[float]:
        from engine.parallel.device import global_sum

        return global_sum(values)  # the buffer lives on the backend's device (NCCL: the GPU)

    def banner(self) -> None:
        params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        totals = self._global_sum([params, trainable])  # collective: every rank calls banner()
        c = self.cfg
        lines = [
            f"stage {c.train.stage} | world {dist.get_world_size()} = TP {c.parallel.tensor_model_parallel_size} x "
            f"PP {c.parallel.pipeline_model_parallel_size} x DP {self.dp_size}",
            f"parameters (all ranks' shards summed) {totals[0] / 1e6:.2f}M, trainable {totals[1] / 1e6:.2f}M | frozen: "
            f"vision={c.model.vision.freeze} projector={c.model.projector.freeze} llm={c.model.llm.freeze}",
            f"data {c.data.train_path} ({len(self.data.ctx.planner.source)} samples, format {c.data.format}, "
            f"packing={c.data.packing}) | {self.batch_line()}",
            f"steps {self.step} -> {c.train.max_steps} | run dir {c.train.run_dir}",
        ]
        self._notice("\n[engine] ".join(lines))

    # ------------------------------------------------------------------ stage hooks
    def microbatches_per_step(self) -> int | None:
        """Micro-batches per optimizer step on each DP rank (from train.global_batch_size), None where a stage
        sizes its own (GRPO packs each episode's rollouts)."""
        return self.cfg.train.num_microbatches(self.dp_size)

    def batch_line(self) -> str:
        c = self.cfg.train
        return (f"seq {c.seq_length} | global batch {c.global_batch_size} = {self.num_micro} micro-batches x "
                f"{c.micro_batch_size} x DP {self.dp_size}")

    def loss_factory(self):
        """megatron loss function per micro-batch (SFT: masked NLL over assistant tokens)."""
        impl = self.cfg.train.loss_impl
        return nll_loss_factory(self.pg.tp, self.cfg.model.llm.vocab_size, impl, output_weight(self.model, impl))

    def build_data(self, state: dict | None):
        from engine.data.loader import build_train_iterator

        return build_train_iterator(self.cfg, self.dp_rank, self.dp_size, state=state)

    def setup_stage(self, resuming: bool) -> None:
        """Stage-specific set-up after the model is built, before a checkpoint is loaded."""

    def frozen_reference(self, resuming: bool, what: str):
        """A frozen copy of the policy as it was when this run started (MPO's π0, GRPO's KL reference).

        Kept in <run_dir>/reference so that a resumed run uses the same one.
        """
        from pathlib import Path

        from engine.model.build import build_for_this_stage

        ref = build_for_this_stage(self.cfg, self.pg)
        prepare_model(ref, self.cfg.train.loss_impl)
        ref.freeze(vision=True, projector=True, llm=True)
        ref_dir = Path(self.cfg.train.run_dir) / "reference"
        if (ref_dir / "meta.json").exists():
            ckpt.load_model_only(ref_dir, ref)
        elif resuming:
            raise FileNotFoundError(f"{ref_dir} is missing: the {what} of this run is gone; resume is impossible "
                                    "without it")
        else:
            ref.load_state_dict(self.model.state_dict())
            ckpt.save_model_only(ref_dir, ref, meta={"what": what})
        return ref.eval()

    def prepare(self, microbatches: list[dict]) -> None:
        """Runs before forward/backward (MPO: the reference model's log-probs)."""

    def report_sums(self, reports: list[dict]) -> dict[str, float]:
        """This DP replica's additive metrics; must contain 'loss_sum' and 'count'."""
        r = summarize_lm(reports)
        return {"loss_sum": r["loss_sum"], "count": r["num_tokens"]}

    def finish_metrics(self, sums: dict[str, float]) -> dict:
        """Global sums -> logged fields (and stage state updates, e.g. MPO's δ)."""
        return {"loss_tokens": int(sums["count"])}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        microbatches = [next(self.data) for _ in range(self.num_micro)]
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        self.prepare(microbatches)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = forward_backward(self.ddp, microbatches, self.pg, self.loss_factory())
        reporter = self._is_loss_reporter()
        local = self.report_sums(reports) if reporter else {}
        if self._metric_keys is None:  # a stage's report keys never change: agree on them once
            self._metric_keys = self._agree_on_keys(sorted(local))
        keys = self._metric_keys
        tokens_in, squared_lengths = token_stats(microbatches)  # real tokens (no padding), sum of L_i^2
        slots = sum(int(mb["tokens"].numel()) for mb in microbatches)  # token slots incl. padding
        tiles = sum(int(mb["tiles_per_row"].sum()) for mb in microbatches)
        seqs = sum(len(ids) for mb in microbatches for ids in mb["sample_ids"])
        values = self._global_sum([local.get(k, 0.0) for k in keys]
                                  + ([seqs, tokens_in, tiles, squared_lengths, slots] if reporter else [0.0] * 5))
        sums = dict(zip(keys, values[: len(keys)]))
        seqs, n_tokens, n_tiles, n_squared, n_slots = values[len(keys):]
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        stepped, grad_norm = self.optimizer_step(loss, sums["count"])
        skipped = not stepped
        self.step += 1
        dt = time.perf_counter() - t0
        flops = step_flops(cfg.model, int(n_tokens), int(n_squared), int(n_tiles))
        world = dist.get_world_size()
        record = {
            "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
            "skipped_steps": self.skipped_steps, "empty_steps": self.empty_steps, **self.finish_metrics(sums),
            "tokens_per_s": n_tokens / dt, "samples_per_s": seqs / dt, "step_time_s": dt,
            "pack_fill": n_tokens / max(n_slots, 1.0),  # real tokens / token slots of the step's rows
            "tflops_per_gpu": flops / dt / world / 1e12,
            "mfu": (flops / dt / world / self._peak_flops) if self._peak_flops else None,
            "memory_gb": (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                          else psutil.Process().memory_info().rss) / 2**30,
            "data_skipped": self.data_skipped(),
        }
        return record

    def _skips_since_start(self) -> dict[str, int]:
        """Samples skipped by the data iterators of this process's run, summed over the data-parallel ranks."""
        parts = [None] * self.dp_size
        dist.all_gather_object(parts, dict(self.data.skips.counts), group=self.pg.dp)
        total = Counter(self.skips_carried)
        for part in parts:
            total.update(part)
        return dict(total)

    def data_skipped(self) -> dict[str, int]:
        """Collective. Samples skipped so far, by reason: every data-parallel rank's, kept across resumes, plus the
        whole-file filters (e.g. below_pair_reward_gap, counted once)."""
        total = Counter(self._skips_since_start())
        total.update(getattr(self.data.ctx, "filtered", {}))
        return dict(sorted(total.items()))

    def optimizer_step(self, loss: float, count: float) -> tuple[bool, float]:
        """The one optimizer-step path of every stage (SFT-like, MPO, each of GRPO's gradient steps), after the
        gradients of the step are accumulated. `loss` and `count` (learned tokens, or pairs / rows) are global sums
        over the data-parallel ranks, so every rank takes the same decision.

        Skipped, and counted in `skipped_steps`: a step with nothing to learn (count 0 on every rank, e.g. every
        sample failed to load; also counted in `empty_steps`), a non-finite loss or gradient (a NaN/inf gradient
        would poison every weight through the clip coefficient), or a step the optimizer itself refuses.
        Non-finite and refused steps count towards `train.max_bad_steps` in a row. Returns (stepped, grad_norm)."""
        if count <= 0:
            self.skipped_steps += 1
            self.empty_steps += 1
            return False, float("nan")
        if not (math.isfinite(loss) and self._grads_finite()):
            self.skipped_steps += 1
            self.bad_steps_in_a_row += 1
            return False, float("nan")
        ok, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.bad_steps_in_a_row = 0 if ok else self.bad_steps_in_a_row + 1
        if not ok:
            self.skipped_steps += 1
        return bool(ok), grad_norm

    def _grads_finite(self) -> bool:
        """All ranks agree whether every local gradient is finite (before the optimizer touches them)."""
        flags = [torch.isfinite(g).all() for p in self.model.parameters()
                 if p.requires_grad and (g := getattr(p, "main_grad", None)) is not None]
        bad = 0.0 if not flags or bool(torch.stack(flags).all()) else 1.0  # one device sync, not one per tensor
        return self._global_sum([bad])[0] == 0

    def _agree_on_keys(self, keys: list[str]) -> list[str]:
        """Reporter ranks know the metric names; broadcast them so every rank reduces the same vector."""
        objs = [None] * dist.get_world_size()
        dist.all_gather_object(objs, keys)
        return max(objs, key=len)

    # ------------------------------------------------------------------ evaluation
    # validation metric for early stopping and the default checkpoint selection: (key, higher is better)
    validation_metric: tuple[str, bool] = ("valid_loss", False)

    def evaluate(self) -> dict[str, float]:
        """Token-mean validation loss over the first `eval_batches` global batches of data.valid_path."""
        from engine.data.loader import build_train_iterator

        c = self.cfg
        data = build_train_iterator(c, self.dp_rank, self.dp_size, path=c.data.valid_path)
        loss_sum = count = 0.0
        with torch.no_grad():
            for _ in range(c.train.eval_batches):
                micro = [next(data) for _ in range(self.num_micro)]
                reports = forward_backward(self.ddp, micro, self.pg, self.loss_factory(), forward_only=True)
                if self._is_loss_reporter():
                    r = summarize_lm(reports)
                    loss_sum, count = loss_sum + r["loss_sum"], count + r["num_tokens"]
        total, n = self._global_sum([loss_sum, count])
        return {"valid_loss": total / max(n, 1.0)}

    def selection_metric(self) -> tuple[str, bool] | None:
        """(metric key, higher is better) that picks the run's `best` checkpoint, or None (no selection)."""
        return self.validation_metric if self.cfg.train.eval_interval else None

    def _selection_score(self) -> tuple[str, float, bool] | None:
        """The selection metric of the step being saved (None when that step's record lacks it)."""
        sel = self.selection_metric()
        record = self.last_record
        if sel is None or record.get("step") != self.step or record.get(sel[0]) is None:
            return None
        return sel[0], float(record[sel[0]]), sel[1]

    # ------------------------------------------------------------------ loop
    def save(self) -> None:
        """Collective. Per rank: RNG and stage state; for the run (meta.json): counters, skip counts and every DP
        rank's data position (so a resume into another TP/PP layout at the same DP size continues exactly)."""
        from engine.parallel.wrap import sync_params

        c = self.cfg
        sync_params(self.ddp)  # parameters are current (performance.overlap_param_gather defers their all-gather)
        positions = [None] * self.dp_size
        dist.all_gather_object(positions, self.data.state_dict(), group=self.pg.dp)
        counters = {"skipped_steps": self.skipped_steps, "empty_steps": self.empty_steps,
                    "data_skipped": self._skips_since_start()}
        ckpt.save_checkpoint(
            c.train.run_dir, self.step, self.model, self.optimizer,
            trainer_state={"extra": self.extra_state()},
            meta={"config": to_dict(c), "dp_size": self.dp_size, "world_size": dist.get_world_size(),
                  "layout": self._layout(), "counters": counters, "data_positions": positions,
                  "tokenizer_path": c.data.tokenizer_path},
            keep=c.train.keep_checkpoints, score=self._selection_score(),
        )
        self.metrics.message(f"[engine] checkpoint step {self.step} -> {ckpt.checkpoint_root(c.train.run_dir)}")

    def fit(self) -> int:
        c = self.cfg.train
        self.banner()
        last_saved = self.step
        key, higher = self.validation_metric
        best, evals_since_best = None, 0
        self.last_record: dict = {}  # the newest step's metrics (its selection metric scores a save)
        try:
            while self.step < c.max_steps:
                record = self.last_record = self.train_step()
                if c.eval_interval and self.step % c.eval_interval == 0:
                    record.update(self.evaluate())
                    value = record[key]
                    if ckpt.improves(value, best, higher):
                        best, evals_since_best = value, 0
                    else:
                        evals_since_best += 1
                    record["early_stop"] = bool(c.early_stopping_patience and evals_since_best >= c.early_stopping_patience)
                if self.step % c.log_interval == 0 or self.step == c.max_steps:
                    self.metrics.log(record)
                if self.bad_steps_in_a_row >= c.max_bad_steps:
                    self.save()
                    raise TooManyBadSteps(
                        f"{self.bad_steps_in_a_row} steps in a row had a non-finite loss or gradient norm "
                        f"(last loss {record['loss']}, grad norm {record['grad_norm']}); stopped with a checkpoint at "
                        f"step {self.step}. Lower optim.lr, check the data, or raise train.max_bad_steps."
                    )
                if record.get("early_stop"):
                    self.save()
                    self.metrics.message(f"[engine] early stopping at step {self.step}: {key} has not improved "
                                         f"for {evals_since_best} evaluations (best {best:.4f})")
                    return 0
                stop = self._global_sum([float(self._stop_requested)])[0] > 0
                if stop:
                    self.save()
                    self.metrics.message(f"[engine] SIGTERM: saved step {self.step}, exiting")
                    return 0
                if c.save_interval and self.step % c.save_interval == 0 and self.step < c.max_steps:
                    self.save()
                    last_saved = self.step
            if last_saved != self.step:
                self.save()
        finally:
            self.metrics.close()
        return 0


def run(cfg, resume: str | None = None) -> int:
    os.makedirs(cfg.train.run_dir, exist_ok=True)
    trainer = Trainer(cfg, resume=resume)
    code = trainer.fit()
    from engine.parallel.init import shutdown

    shutdown()
    return code

