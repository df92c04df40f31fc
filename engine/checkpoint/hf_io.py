"""Reading and writing HF checkpoint directories (safetensors, sharded with an index), lazily.

`HFReader.get(name)` reads one tensor from its (memory-mapped) safetensors file, so converters hold
one tensor group at a time. `HFWriter` buffers tensors up to `max_shard_bytes` and flushes shards in
HF's naming (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files copied alongside the weights: tokenizer, chat template, processor, generation defaults.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)
TOKENIZER_FILES = AUX_FILES[:9]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match the config; says what to do."""


def read_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; point --hf-dir at a HF checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class HFReader:
    """name -> tensor over every safetensors file of a HF checkpoint directory."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, list[str]] = {}
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
            for name, file in weight_map.items():
                self._where[name] = self.dir / file
            for file in sorted(set(self._where.values())):
                if not file.is_file():
                    raise CheckpointError(
                        f"{index} lists shard {file.name} but {file} does not exist; the checkpoint is incomplete, "
                        "re-download the missing shard"
                    )
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors files (and no {INDEX}); only safetensors is read")
            for file in files:
                for name in self._open(file):
                    self._where[name] = file

    def _open(self, file: Path) -> list[str]:
        """The tensor names of a shard; checks its header once."""
        if file not in self._handles:
            try:
                with safe_open(str(file), framework="pt") as f:
                    self._handles[file] = list(f.keys())
            except Exception as e:  # safetensors raises SafetensorError / OSError on a damaged header
                raise CheckpointError(f"{file}: cannot open as safetensors ({e}); the file is corrupted, re-download it") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str, needed_for: str = "") -> Path:
        """The safetensors file holding `name` (its header checked)."""
        if name not in self._where:
            hint = f" (needed for our '{needed_for}')" if needed_for else ""
            raise CheckpointError(
                f"{self.dir}: no tensor '{name}'{hint}; the checkpoint does not match its config.json "
                "or is not the layout it claims"
            )
        file = self._where[name]
        self._open(file)  # a clear error for a damaged header
        return file

    def get(self, name: str, needed_for: str = "") -> torch.Tensor:
        file = self.file_of(name, needed_for)
        try:
            # Open per read: a kept-open file stays memory-mapped, and every page read counts in RSS.
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: reading '{name}' failed ({e}); the shard is corrupted, re-download it") from None


class HFWriter:
    """Buffered, sharded safetensors writer; `close()` names the shards and writes the index."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 << 30):  # 2 GiB: HF's usual shard size
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buf[name] = t.detach().contiguous()
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self._buf:
            return
        path = self.dir / f"part-{len(self._shards):05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self._shards)
        if n == 1:
            (self.dir / "part-00000.safetensors").rename(self.dir / SINGLE)
            return
        weight_map = {}
        for k, names in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / f"part-{k:05d}.safetensors").rename(self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(src: str | Path, dst: str | Path, names=AUX_FILES) -> list[str]:
    """Copy tokenizer / processor / generation files that exist in src. Returns the names copied."""
    copied = []
    for name in names:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied
