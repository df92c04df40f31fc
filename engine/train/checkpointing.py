"""Training checkpoints: megatron dist checkpoint (model + optimizer) + run state, written by the one
checkpoint writer (engine/checkpoint/atomic.py: all-or-nothing, a sha256 of every file).

Layout under <run_dir>/checkpoints:
    step_000010/            torch_dist checkpoint of model and optimizer (any TP/PP/DP can load it)
    step_000010/trainer/rank00003.pt   per-rank RNG states and stage state (e.g. GRPO's sample buffer)
    step_000010/meta.json   step, config, layout, counters, skip counts, every DP rank's data position
    step_000010/checksums.json   size and sha256 of every file above
    latest                  name of the newest complete checkpoint, replaced atomically last
    best, best.json         the checkpoint with the best selection metric so far (train: valid_loss;
                            GRPO: algorithm.metrics.select_checkpoint_by); rotation never removes it

A checkpoint is written to `step_N.partial` and renamed when every rank is done, so a kill while writing
leaves the previous checkpoint usable; leftover `.partial` / `.tmp` dirs are removed at the next start.
`--resume auto` verifies the checksums of `latest` and falls back to the newest intact checkpoint, with a
warning that names what was wrong.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint.atomic import (CHECKSUMS, atomic_output_dir, describe, is_error, require_intact, short_error,
                                     verify_checksums)
from engine.checkpoint.hf_io import CheckpointError

# The default DistributedOptimizer sharding ("fully_sharded_model_space") fails on CPU with
# "flattened_range is not supported"; fully_reshardable also lets a run resume at another DP size.
OPTIM_SHARDING = "fully_reshardable"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _notice(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[engine] {text}", flush=True)


def _pointer(root: Path, name: str) -> str | None:
    path = root / name
    return path.read_text().strip() if path.is_file() else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names (not verified; see find_resume_checkpoint), or None."""
    root = checkpoint_root(run_dir)
    name = _pointer(root, "latest")
    if name is None:
        return None
    path = root / name
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{root / 'latest'} names {path.name}, which is incomplete or missing; "
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


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete-looking step_N dirs, newest first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


# ---------------------------------------------------------------------------------------------- integrity
def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: meta.json is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path}/meta.json has no integer 'step'")
    return meta


def checkpoint_problems(path: Path) -> list[str]:
    """Collective. What makes this training checkpoint unusable for a resume ([] = intact): its files against
    checksums.json, meta.json, and (for a checkpoint without checksums) the rank files of its world size."""
    problems = verify_checksums(path)
    unverified = bool(problems) and problems[0].startswith(f"no {CHECKSUMS}")
    if unverified:
        problems = []
        _notice(f"WARNING: {path.name} has no {CHECKSUMS} (written before checksums existed): not verified")
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return problems + [str(e).replace(f"{path}/", "").replace(f"{path}: ", "")]
    if unverified:
        world = meta.get("world_size") or 1
        problems += [f"trainer/rank{r:05d}.pt is missing" for r in range(world)
                     if not (path / "trainer" / f"rank{r:05d}.pt").is_file()]
    return problems


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """Collective (`--resume auto`). `latest` when intact, else the newest intact step_N, warning about each damaged
    one with what is wrong. None when the run has no checkpoint; CheckpointError when none is intact."""
    root = checkpoint_root(run_dir)
    candidates, seen = [], set()
    latest = _pointer(root, "latest")
    if latest is not None:
        candidates.append(root / latest)
    for _, path in step_dirs(root):
        candidates.append(path)
    tried = []
    for path in candidates:
        if path.name in seen:
            continue
        seen.add(path.name)
        problems = [f"{path.name} does not exist"] if not path.is_dir() else checkpoint_problems(path)
        if not problems:
            if tried:
                _notice(f"WARNING: resuming from {path.name}, the newest intact checkpoint; "
                        f"{'; '.join(tried)}. Checkpoints after it are replaced as the run reaches their steps.")
            return path
        tried.append(f"{path.name} is damaged: {describe(problems)}")
        _notice(f"WARNING: {tried[-1]}")
    if tried:
        raise CheckpointError(f"no intact checkpoint in {root}: {' | '.join(tried)}. Resume from a copy, or start a "
                              "new run (another train.run_dir, or --overwrite)")
    return None


def resume_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """Collective. `--resume auto`: find_resume_checkpoint. `--resume PATH` (a checkpoint dir, a pointer or a run
    dir): that checkpoint, which must be intact (no fallback: the user chose it)."""
    if resume == "auto":
        return find_resume_checkpoint(run_dir)
    try:
        path = resolve_checkpoint(resume)
    except FileNotFoundError as e:
        raise CheckpointError(f"--resume {resume}: {e}") from None
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"--resume {resume}: {path.name} is damaged: {describe(problems)}; pick another "
                              "checkpoint, or --resume auto for the newest intact one")
    return path


# ---------------------------------------------------------------------------------------------- RNG state
def _rng_state() -> dict:
    """Every RNG this process uses, as plain tensors / ints (loadable with torch.load(weights_only=True))."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# numpy arrays in trainer states written before they were stored as tensors
_OLD_NUMPY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                      "numpy.dtype"}


def _global(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def load_trainer_state(path: Path) -> dict:
    """A rank file, unpickled safely (torch.load(weights_only=True)); the engine's own classes (e.g. a GRPO
    buffer's samples) are allowed by name, nothing else. Raises CheckpointError naming the file."""
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        needed = get_unsafe_globals_in_checkpoint(path)
        unknown = [g for g in needed if not (g.startswith("engine.") or g in _OLD_NUMPY_GLOBALS
                                              or g.startswith("numpy.dtypes."))]
        if unknown:
            raise CheckpointError(f"{path} needs classes outside the engine to be read ({unknown[:3]}); "
                                  "it was not written by this trainer")
        with safe_globals([_global(g) for g in needed]):
            return torch.load(path, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's messages suggest unsafe unpickling; give ours
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); the checkpoint is damaged") from None


# ---------------------------------------------------------------------------------------------- save / load
def _optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _fresh_adam_states(optimizer) -> None:
    """Give every parameter of a torch Adam/AdamW that has not stepped yet the state Adam itself would create at its
    first step (step 0, zero moments). megatron's distributed optimizer (torch fallback, no TE/Apex) cannot write a
    state dict before its first step ("assert len(steps) == 1"), which a run whose every step so far was skipped
    has not taken. Resuming from these states is the same as starting Adam fresh; nothing else changes (megatron's
    `_init_optimizer_states_with_dummy_values` would take a real step, and weight decay would move the weights)."""
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if p.numel() == 0 or inner.state.get(p):
                    continue
                state = {"step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                inner.state[p] = state


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
    """Collective: every rank calls it. `trainer_state` is this rank's (RNG states are added), `meta` the run's
    (rank 0's is written). Returns the final directory. `score` = (metric, value, higher is better) of this step:
    when it beats the run's best, `best` / `best.json` name this checkpoint."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    rank = dist.get_rank()
    if optimizer is not None:
        _fresh_adam_states(optimizer)
    with atomic_output_dir(root / name, force=True) as tmp:
        dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp))
        (tmp / "trainer").mkdir(exist_ok=True)
        torch.save({"rng": _rng_state(), **trainer_state}, tmp / "trainer" / f"rank{rank:05d}.pt")
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
    if rank == 0:
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, root / "latest")  # only now does resume see it
        _update_best(root, name, step, score)
        _rotate(root, keep, current_step=step)
    dist.barrier()
    return root / name


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


def _rotate(root: Path, keep: int, current_step: int | None = None) -> None:
    """Keep the newest `keep` checkpoints (0: all). Never removed: the ones `latest` and `best` name, and any
    of a step after `current_step` (left by a run resumed from an earlier checkpoint; replaced when the run
    saves that step again)."""
    if keep <= 0:
        return
    protected = {_pointer(root, "latest"), _pointer(root, "best")}
    done = [(s, p) for s, p in step_dirs(root) if current_step is None or s <= current_step]
    for _, old in done[keep:]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def clean_partial(run_dir) -> None:
    """Remove what killed writers left: `step_N.partial` (`.tmp` from older versions), `*.replaced`, pointer temps."""
    if dist.get_rank() == 0:
        root = checkpoint_root(run_dir)
        for pattern in ("*.partial", "*.tmp", "*.replaced"):
            for tmp in root.glob(pattern):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    dist.barrier()


def load_checkpoint(path: Path, model, optimizer, layout: dict) -> tuple[dict, dict | None]:
    """Load model + optimizer (resharding to this run's TP/PP/DP). Returns (meta, this rank's trainer state or
    None). `layout` = this run's {world_size, tensor_model_parallel_size, pipeline_model_parallel_size}: the
    per-rank state (RNG, stage state) is restored only into the same layout; a missing rank file of that
    layout is an error (never another rank's state)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    if optimizer is not None:
        for opt in _optimizers(optimizer):
            # Optimizer states must exist before a dist-checkpoint load can fill them in place.
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                opt._init_optimizer_states_with_dummy_values()
    try:
        state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if not is_error(e):
            raise
        raise CheckpointError(f"{path}: loading the dist checkpoint failed ({short_error(e)})") from None
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
    stored = meta.get("layout") or {"world_size": meta.get("world_size")}  # older checkpoints: world size only
    same_layout = stored.get("world_size") == layout["world_size"] and all(stored.get(k, v) == v
                                                                           for k, v in layout.items())
    rank_file = path / "trainer" / f"rank{dist.get_rank():05d}.pt"
    if not same_layout:
        return meta, None
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file} is missing: this rank's RNG and stage state are gone; the checkpoint is "
                              "damaged (resume from an older one)")
    trainer_state = load_trainer_state(rank_file)
    _set_rng_state(trainer_state["rng"])
    return meta, trainer_state


def save_model_only(path: str | Path, model, meta: dict) -> None:
    """Model weights alone (e.g. MPO's frozen reference), written all-or-nothing with checksums."""
    from megatron.core import dist_checkpointing

    with atomic_output_dir(path, force=True) as tmp:
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))
        if dist.get_rank() == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def load_model_only(path: str | Path, model, model_cfg=None, allow: list[str] | None = None) -> dict:
    """Load model weights from a checkpoint written by save_checkpoint, save_model_only or the converter (any TP/PP,
    and any ViT head padding: a TP=1 conversion of InternViT-6B loads into a TP=8 model). Collective. The files are
    verified against checksums.json first; with `model_cfg` (train.init_from) the stored model config must match,
    except the fields in `allow` (engine/train/init_from.py)."""
    from engine.checkpoint.mcore_io import read_meta as read_checkpoint_meta
    from engine.checkpoint.vit_padding import load_sharded
    from engine.train.init_from import check_init_from_config

    path = Path(path)
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    require_intact(path)
    if model_cfg is not None:
        for line in check_init_from_config(path, model_cfg, list(allow or [])):
            _notice(f"init_from: allowed difference {line}")
    try:
        state = load_sharded({"model": model.sharded_state_dict()}, path,
                             lambda: read_checkpoint_meta(path)["model_config"])
        model.load_state_dict(state["model"])
    except CheckpointError:
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if not is_error(e):
            raise
        raise CheckpointError(f"{path}: loading the model weights failed ({short_error(e)})") from None
    return json.loads((path / "meta.json").read_text())
