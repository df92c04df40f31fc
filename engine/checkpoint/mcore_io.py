"""Megatron dist checkpoints (torch_dist) of the VLM at any TP/PP, plus a small metadata file.

A checkpoint directory holds megatron's files (`metadata.json`, `common.pt`, `__*.distcp`) and ours,
`engine_checkpoint.json`: the model config, step, tokenizer path, the TP/PP it was written at and,
when it came from HF, the original config.json (so an export keeps keys we don't model).

Resharding is megatron's: the stored tensors are global (full) tensors, every rank of any TP/PP layout
reads the slices it owns. The vocab rows are stored padded for the writer's TP (megatron marks the
embedding `allow_shape_mismatch`); readers pad/trim to their own padding, the padded rows are zeros.

`read_groups` streams a checkpoint one tensor group at a time without building the model: a TP=1/PP=1
model is built on the meta device for its sharded-state-dict *structure* only, and each group's
tensors are read into fresh CPU buffers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.checkpoint.dcp_slices import LOAD_ERRORS, read_slices, short_error, stored_tensors
from engine.checkpoint.hf_io import CheckpointError
from engine.checkpoint.vit_padding import load_sharded
from engine.config.base import from_dict, to_dict
from engine.config.model import ModelConfig

META = "engine_checkpoint.json"
TRAINER_META = "meta.json"
FORMAT_VERSION = 1
VOCAB_PARAM_NAMES = ("llm.embedding.word_embeddings.weight", "llm.output_layer.weight")
# Fields that may differ between the writer and the reader of a checkpoint (not architecture).
# padded_num_heads: extra all-zero ViT heads for a TP size; a checkpoint loads with any padding (vit_padding).
FREE_FIELDS = {"freeze", "transformer_impl", "params_dtype", "padded_num_heads"}


def write_meta(ckpt_dir: Path, mcfg: ModelConfig, *, step: int, tokenizer_path: str | None, tp: int, pp: int,
               hf_config: dict | None = None, hf_layout: str | None = None, sources: dict | None = None) -> None:
    meta = {
        "format_version": FORMAT_VERSION, "model": to_dict(mcfg), "step": step, "tokenizer_path": tokenizer_path,
        "written_at": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "hf_layout": hf_layout, "hf_config": hf_config, "sources": sources or {},
    }
    (Path(ckpt_dir) / META).write_text(json.dumps(meta, indent=2) + "\n")
    # The trainer's checkpoint marker (engine/train/checkpointing.py): with it, `train.init_from` can
    # start from a converted checkpoint.
    trainer_meta = {"step": step, "config": {"model": meta["model"]}, "written_by": "engine.checkpoint"}
    (Path(ckpt_dir) / TRAINER_META).write_text(json.dumps(trainer_meta, indent=1) + "\n")


def _from_trainer_meta(ckpt_dir: Path) -> dict | None:
    """A training checkpoint (engine/train/checkpointing.py) carries the full config in meta.json."""
    path = ckpt_dir / TRAINER_META
    if not path.is_file():
        return None
    trainer = json.loads(path.read_text())
    config = trainer.get("config") or {}
    if "model" not in config:
        return None
    tok = (config.get("data") or {}).get("tokenizer_path")
    return {"format_version": FORMAT_VERSION, "model": config["model"], "step": trainer.get("step", 0),
            "tokenizer_path": tok if tok and Path(tok).is_dir() else None, "hf_layout": None, "hf_config": None}


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META
    if not path.is_file() and (trainer := _from_trainer_meta(Path(ckpt_dir))) is not None:
        trainer["model_config"] = from_dict(ModelConfig, trainer["model"])
        return trainer
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir}: no {META}; not a checkpoint written by this engine (or an interrupted write). "
            "Convert a HF checkpoint with tools/convert_checkpoint.py hf-to-mcore"
        )
    try:
        meta = json.loads(path.read_text())
        meta["model_config"] = from_dict(ModelConfig, meta["model"])
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from None
    return meta


def _flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{pre}{k}."))
        else:
            out[f"{pre}{k}"] = v
    return out


def config_differences(saved: ModelConfig, ours: ModelConfig) -> list[str]:
    a, b = _flat(to_dict(saved)), _flat(to_dict(ours))
    return [f"model.{k}: checkpoint {a[k]!r}, config {b.get(k)!r}" for k in sorted(a)
            if k.split(".")[-1] not in FREE_FIELDS and a[k] != b.get(k)]


def save_model(model, ckpt_dir: str | Path) -> None:
    """Collective over all ranks. The caller writes the metadata (rank 0) and renames the directory."""
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))


def save_checkpoint(model, mcfg: ModelConfig, ckpt_dir: str | Path, *, step: int, tokenizer_path: str | None,
                    tp: int, pp: int, force: bool = False) -> None:
    """For training loops: dist checkpoint + metadata, all-or-nothing with checksums (the one checkpoint writer,
    engine/checkpoint/atomic.py; collective over all ranks)."""
    from engine.checkpoint.atomic import atomic_output_dir, rank

    with atomic_output_dir(ckpt_dir, force) as tmp:
        save_model(model, tmp)
        if rank() == 0:
            write_meta(tmp, mcfg, step=step, tokenizer_path=tokenizer_path, tp=tp, pp=pp)


def load_model(model, ckpt_dir: str | Path, mcfg: ModelConfig) -> dict:
    """Load into a model built for any TP/PP (and any ViT head padding). Refuses another architecture."""
    meta = read_meta(ckpt_dir)
    diff = config_differences(meta["model_config"], mcfg)
    if diff:
        raise CheckpointError(
            f"{ckpt_dir}: the checkpoint's model config differs from the one asked for:\n  " + "\n  ".join(diff)
            + f"\nbuild the model from the checkpoint's config ({Path(ckpt_dir) / META}) or fix the recipe"
        )
    _check_files(ckpt_dir)
    try:  # ViT heads padded for another TP size are re-padded on the way in
        state = load_sharded(model.sharded_state_dict(), ckpt_dir, lambda: meta["model_config"])
    except CheckpointError:
        raise
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{ckpt_dir}: loading the dist checkpoint failed ({short_error(e)})") from e
    model.load_state_dict(state, strict=True)
    return meta


def _check_files(ckpt_dir) -> None:
    d = Path(ckpt_dir)
    for name in ("metadata.json", ".metadata", "common.pt"):
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: megatron file '{name}' is missing; the checkpoint is incomplete")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(d)).read_metadata().storage_data
    except Exception as e:
        raise CheckpointError(f"{d}/.metadata is unreadable ({e}); the checkpoint is corrupted") from None
    files = sorted({info.relative_path for info in storage.values()})
    missing = [f for f in files if not (d / f).is_file()]
    if missing or not files:
        raise CheckpointError(
            f"{d}: shard file {missing[0] if missing else '*.distcp'} (of {len(files)} listed in .metadata) does not "
            "exist; the checkpoint is incomplete: copy it again or convert again"
        )
    from engine.checkpoint.atomic import require_intact

    require_intact(d)  # every file against the checksums.json the writer made (collective)


def build_meta_model(mcfg: ModelConfig, pg):
    """A TP=1/PP=1 model on the meta device: its sharded state dict gives names, keys and shapes."""
    from engine.checkpoint.conversion_config import engine_config
    from engine.model.build import build_vlm

    cfg = engine_config(to_dict(mcfg), tp=1, pp=1)
    with torch.device("meta"):
        return build_vlm(cfg, pg, pre_process=True, post_process=True)


class GroupReader:
    """Reads our full tensors by name from a dist checkpoint, a few at a time, in one process.

    megatron stores each LLM parameter kind as one layer-stacked global tensor [L, ...] (keys like
    `llm.decoder.layers.mlp.linear_fc1.weight`, norms under TE's fused names), the SwiGLU fc1 as the
    full [gate; up], the vocab padded for the writer's TP. The key of each of our parameters comes from
    a meta-device TP=1/PP=1 model's sharded state dict; the bytes are read with torch DCP directly
    (megatron's own loader cannot read one layer of a stacked tensor in a single process).
    """

    def __init__(self, ckpt_dir: str | Path, pg):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        self.dir = Path(ckpt_dir)
        self.meta = read_meta(ckpt_dir)
        self.mcfg: ModelConfig = self.meta["model_config"]
        _check_files(ckpt_dir)
        self._stored = stored_tensors(self.dir)
        model = build_meta_model(self.mcfg, pg)
        self._entries = {}  # our name -> (stored key, layer index or None, shape)
        for name, sh in model.sharded_state_dict().items():
            if isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                layer = int(name.split(".")[3]) if name.startswith("llm.decoder.layers.") else None
                self._entries[name] = (sh.key, layer, tuple(sh.data.shape))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        slices, out = {}, {}
        for n in names:
            if n not in self._entries:
                raise CheckpointError(f"{self.dir}: the model has no tensor '{n}'; metadata and weights disagree")
            key, layer, shape = self._entries[n]
            if key not in self._stored:
                raise CheckpointError(f"{self.dir}: tensor '{key}' (our '{n}') is missing from the checkpoint")
            stored = self._stored[key]
            if n in VOCAB_PARAM_NAMES:
                shape = (self.mcfg.llm.vocab_size, *shape[1:])  # the real rows; padding stays on disk
            offsets = (0,) * len(shape)
            if layer is not None:
                shape, offsets = (1, *shape), (layer, *offsets)
            want = tuple(stored.size)
            if len(want) != len(shape) or any(o + s > w for o, s, w in zip(offsets, shape, want)):
                raise CheckpointError(
                    f"{self.dir}: '{key}' is stored with shape {want}, which cannot hold our '{n}' {shape} at {offsets}; "
                    "the metadata's model config does not match the weights"
                )
            buf = torch.empty(shape, dtype=stored.properties.dtype)
            slices[key], out[n] = (offsets, buf), buf
        read_slices(self.dir, slices, f"{names[:2]}...")
        return {n: (t[0] if self._entries[n][1] is not None else t) for n, t in out.items()}
