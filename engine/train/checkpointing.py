"""Training checkpoints: megatron dist checkpoint (model + optimizer) + per-rank trainer state.

Layout under <run_dir>/checkpoints:
    step_000010/            torch_dist checkpoint of model and optimizer (any TP/PP/DP can load it)
    step_000010/trainer/rank00003.pt   per-rank RNG states and data position
    step_000010/meta.json   step, config, extra state (e.g. MPO's reward shift)
    latest                  name of the newest complete checkpoint, replaced atomically last
    best, best.json         the checkpoint with the best selection metric so far (train: valid_loss;
                            GRPO: algorithm.metrics.select_checkpoint_by); rotation never removes it

A checkpoint is written to `step_N.tmp` and renamed when every rank is done, so a kill while writing
leaves the previous checkpoint usable; leftover `.tmp` dirs are removed at the next start.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# The default DistributedOptimizer sharding ("fully_sharded_model_space") fails on CPU with
# "flattened_range is not supported"; fully_reshardable also lets a run resume at another DP size.
OPTIM_SHARDING = "fully_reshardable"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing; "
                                f"point it at another step_* directory or start without --resume")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a pointer file (`<run_dir>/checkpoints/latest` or `.../best`), or a run dir /
    checkpoints dir whose `latest` names one."""
    path = Path(path)
    if path.is_file() and path.name in ("latest", "best"):
        target = path.parent / path.read_text().strip()
        if not (target / "meta.json").exists():
            raise FileNotFoundError(f"{path} names {target.name}, which is incomplete or missing")
        return target
    for candidate in (path, path / "checkpoints"):
        if (candidate / "meta.json").exists():
            return candidate
        if (candidate / "latest").exists():
            return candidate / (candidate / "latest").read_text().strip()
    raise FileNotFoundError(f"{path}: no checkpoint here (expected meta.json, or a 'latest' file naming one)")


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIM_SHARDING}
        )
    return state


def save_checkpoint(run_dir, step: int, model, optimizer, trainer_state: dict, meta: dict, keep: int,
                    score: tuple[str, float, bool] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. `score` = (metric, value, higher is
    better) of this step: when it beats the run's best, `best` / `best.json` name this checkpoint."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    tmp, final = root / f"{name}.tmp", root / name
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp))
    torch.save({"rng": _rng_state(), **trainer_state}, tmp / "trainer" / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, root / "latest")  # only now does resume see it
        _update_best(root, name, step, score)
        _rotate(root, keep)
    dist.barrier()
    return final


def best_checkpoint_info(run_dir: str | Path) -> dict | None:
    """<run_dir>/checkpoints/best.json: {checkpoint, step, metric, value, higher_is_better}, or None."""
    path = checkpoint_root(run_dir) / "best.json"
    return json.loads(path.read_text()) if path.exists() else None


def improves(value: float, best: float | None, higher_is_better: bool) -> bool:
    """Whether `value` beats `best` (None: nothing to beat yet); ties do not."""
    return best is None or (value > best if higher_is_better else value < best)


def _update_best(root: Path, name: str, step: int, score: tuple[str, float, bool] | None) -> None:
    """Point `best` at this checkpoint when its score beats the recorded one (same metric, still on disk)."""
    if score is None or not math.isfinite(score[1]):
        return
    metric, value, higher = score
    old = best_checkpoint_info(root.parent)
    if old and old["metric"] == metric and (root / old["checkpoint"] / "meta.json").exists():
        if not improves(value, old["value"], higher):
            return
    info = {"checkpoint": name, "step": step, "metric": metric, "value": value, "higher_is_better": higher}
    for file, text in (("best.json", json.dumps(info)), ("best", name)):
        (root / f"{file}.tmp").write_text(text)
        os.replace(root / f"{file}.tmp", root / file)


def _rotate(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints; the one `best` names is always kept."""
    best = (root / "best").read_text().strip() if (root / "best").exists() else None
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(run_dir) -> None:
    if dist.get_rank() == 0:
        for tmp in checkpoint_root(run_dir).glob("*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    dist.barrier()


def load_checkpoint(path: Path, model, optimizer) -> tuple[dict, dict]:
    """Load model + optimizer (resharding to this run's TP/PP/DP). Returns (meta, this rank's trainer state).

    The trainer state of a run with another world size is taken from rank 0's file; its data position
    is then only a hint (the data iterator decides what it can reuse).
    """
    from megatron.core import dist_checkpointing

    if optimizer is not None:
        for opt in _optimizers(optimizer):
            # Optimizer states must exist before a dist-checkpoint load can fill them in place.
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                opt._init_optimizer_states_with_dummy_values()
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        for opt in _optimizers(optimizer):
            inner = getattr(opt, "optimizer", None)
            # After loading, every parameter's Adam `step` is ONE shared tensor; left shared it is
            # incremented once per parameter per step and the resumed run drifts.
            for s in (inner.state.values() if inner is not None else []):
                if "step" in s and torch.is_tensor(s["step"]):
                    s["step"] = s["step"].clone()
    meta = json.loads((path / "meta.json").read_text())
    rank_file = path / "trainer" / f"rank{dist.get_rank():05d}.pt"
    same_world = rank_file.exists() and meta.get("world_size") == dist.get_world_size()
    trainer_state = torch.load(rank_file if same_world else path / "trainer" / "rank00000.pt", weights_only=False)
    if same_world:
        _set_rng_state(trainer_state["rng"])
    return meta, trainer_state


def save_model_only(path: str | Path, model, meta: dict) -> None:
    """Model weights alone (e.g. MPO's frozen reference), written all-or-nothing (`<path>.partial`, renamed)."""
    from megatron.core import dist_checkpointing

    from engine.checkpoint.atomic import atomic_output_dir

    with atomic_output_dir(path, force=True) as tmp:
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))
        if dist.get_rank() == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def load_model_only(path: str | Path, model) -> dict:
    """Load model weights from a checkpoint written by save_checkpoint or save_model_only (any TP/PP, and any
    ViT head padding: a TP=1 conversion of InternViT-6B loads into a TP=8 model)."""
    from engine.checkpoint.mcore_io import read_meta
    from engine.checkpoint.vit_padding import load_sharded

    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
    state = load_sharded({"model": model.sharded_state_dict()}, path, lambda: read_meta(path)["model_config"])
    model.load_state_dict(state["model"])
    return json.loads((path / "meta.json").read_text())
