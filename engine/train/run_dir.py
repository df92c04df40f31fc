"""One run per run directory: a new run refuses a directory that holds another run's outputs.

Without this, a second run in the same `train.run_dir` (no `--resume`) wiped metrics.jsonl and saved
step_N dirs next to the old run's, and rotation then kept the old run's higher-numbered ones.
`--resume auto` continues the run; `--overwrite` deletes the old run's outputs first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# What the stages write into a run dir (iter_* are iterative SFT's per-iteration run dirs).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "reference", "rollouts.jsonl", "iterations.jsonl",
               "rollout_hf")
# Of those, what shows that a run has happened (tensorboard / rollout_hf alone come from a run that died at start).
EVIDENCE = ("checkpoints", "metrics.jsonl", "reference", "rollouts.jsonl", "iterations.jsonl")


class RunDirInUse(ValueError):
    """The run dir holds another run; the message says how to continue, start anew or overwrite."""


def _nonempty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir()) or path.is_file() and path.stat().st_size > 0


def previous_run(run_dir: str | Path) -> list[str]:
    """Names of the outputs of an earlier run in run_dir ([] when there is none)."""
    run_dir = Path(run_dir)
    found = [name for name in EVIDENCE if _nonempty(run_dir / name)]
    return found + sorted(p.name for p in run_dir.glob("iter_*") if p.is_dir() and previous_run(p))


def _global_rank() -> int:
    """Before torch.distributed is initialised: the launcher's rank (torchrun, else Slurm), 0 when alone."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def prepare_run_dir(run_dir: str | Path, resume: str | None, overwrite: bool) -> None:
    """Call on every rank before the run starts. A new run (no resume) in a dir with a previous run's outputs:
    RunDirInUse, or with overwrite those outputs are deleted (by global rank 0; the others wait for it at the
    process-group start-up that follows)."""
    run_dir = Path(run_dir)
    if resume:
        if overwrite:
            raise RunDirInUse("--overwrite and --resume contradict each other: continue the run, or delete it")
        return
    found = previous_run(run_dir)
    if not found:
        return
    if not overwrite:
        raise RunDirInUse(
            f"train.run_dir={run_dir} already holds a run ({', '.join(found)}). Continue it with --resume auto, "
            "start a new run with another train.run_dir, or pass --overwrite to delete that run's outputs first")
    if _global_rank() == 0:
        for name in RUN_OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for path in run_dir.glob("iter_*"):
            shutil.rmtree(path)
        print(f"[engine] --overwrite: deleted the previous run's {', '.join(found)} in {run_dir}", flush=True)
