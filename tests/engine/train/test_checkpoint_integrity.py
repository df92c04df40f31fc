"""The one checkpoint writer (engine/checkpoint/atomic.py) and what the trainer does with damaged checkpoints:
checksums written at save and verified at load, `--resume auto` falling back to the newest intact checkpoint,
safe unpickling, rotation that never deletes what `latest` / `best` name, one run per run dir. Single process."""

from __future__ import annotations

import json
import subprocess
import sys
import pytest
import torch

from engine.checkpoint.atomic import CHECKSUMS, atomic_output_dir, verify_checksums
from engine.checkpoint.hf_io import CheckpointError
from engine.train import checkpointing as ckpt
from tests.helpers.torchrun import REPO


def write_step(root, step: int, world: int = 2, payload: bytes = b"weights" * 1000):
    """A training-checkpoint-shaped step dir written by the real writer: shards, rank files, meta.json."""
    with atomic_output_dir(root / f"step_{step:06d}", force=True) as tmp:
        (tmp / "__0_0.distcp").write_bytes(payload + bytes([step]))
        (tmp / "trainer").mkdir()
        for r in range(world):
            torch.save({"rng": {"torch": torch.get_rng_state()}, "extra": {}}, tmp / "trainer" / f"rank{r:05d}.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": world}))
    (root / "latest").write_text(f"step_{step:06d}")
    return root / f"step_{step:06d}"


def test_the_writer_lists_every_file_with_size_and_sha256(tmp_path):
    d = write_step(tmp_path, 3)
    listed = json.loads((d / CHECKSUMS).read_text())["files"]
    assert set(listed) == {"__0_0.distcp", "trainer/rank00000.pt", "trainer/rank00001.pt", "meta.json"}
    assert listed["meta.json"]["size"] == (d / "meta.json").stat().st_size and len(listed["meta.json"]["sha256"]) == 64
    assert verify_checksums(d) == [] and not (tmp_path / "step_000003.partial").exists()


def test_a_failing_writer_leaves_nothing_and_keeps_the_old_dir(tmp_path):
    old = write_step(tmp_path, 3)
    with pytest.raises(CheckpointError, match=r"writing .*step_000003 failed \(ValueError: boom\)"):
        with atomic_output_dir(old, force=True) as tmp:
            (tmp / "half").write_bytes(b"x")
            raise ValueError("boom")
    assert not (tmp_path / "step_000003.partial").exists() and verify_checksums(old) == []
    with pytest.raises(CheckpointError, match="exists and is not empty; pass --force"):
        with atomic_output_dir(old, force=False):
            pass


DAMAGE = {
    "truncated_shard": (lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:100]),
                        "__0_0.distcp has 100 bytes"),
    "flipped_byte": (lambda d: _flip(d / "__0_0.distcp", 50), "__0_0.distcp does not match its sha256"),
    "bit_rot_4k": (lambda d: _zero(d / "__0_0.distcp", 1000, 4096), "__0_0.distcp does not match its sha256"),
    "truncated_meta": (lambda d: (d / "meta.json").write_text('{"step": 6, "wor'), "meta.json has 16 bytes"),
    "missing_rank_file": (lambda d: (d / "trainer" / "rank00001.pt").unlink(), "trainer/rank00001.pt is missing"),
    "truncated_checksums": (lambda d: (d / CHECKSUMS).write_text('{"algorithm": "sha2'), "checksums.json is unreadable"),
}


def _flip(path, pos):
    b = bytearray(path.read_bytes())
    b[pos] ^= 0xFF
    path.write_bytes(bytes(b))


def _zero(path, start, n):
    b = bytearray(path.read_bytes())
    b[start : start + n] = bytes(len(b[start : start + n]))
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys, damage):
    root = tmp_path / "checkpoints"
    write_step(root, 3, payload=b"w" * 9000)
    latest = write_step(root, 6, payload=b"w" * 9000)
    corrupt, what = DAMAGE[damage]
    corrupt(latest)
    assert ckpt.find_resume_checkpoint(tmp_path) == root / "step_000003"
    out = capsys.readouterr().out
    assert f"step_000006 is damaged: {what}" in out and "resuming from step_000003" in out


def test_no_intact_checkpoint_is_an_error_naming_each_problem(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    _flip(write_step(root, 3) / "__0_0.distcp", 5)
    (write_step(root, 6) / "trainer" / "rank00000.pt").unlink()
    (root / "latest").write_text("step_000009")  # names a checkpoint that is gone
    with pytest.raises(CheckpointError) as e:
        ckpt.find_resume_checkpoint(tmp_path)
    msg = str(e.value)
    assert "step_000009 does not exist" in msg and "step_000006 is damaged: trainer/rank00000.pt is missing" in msg
    assert "step_000003 is damaged: __0_0.distcp does not match its sha256" in msg and "--overwrite" in msg
    assert ckpt.find_resume_checkpoint(tmp_path / "elsewhere") is None  # no checkpoint at all: a fresh start


def test_an_explicit_resume_path_must_be_intact(tmp_path):
    root = tmp_path / "checkpoints"
    old = write_step(root, 3)
    _flip(write_step(root, 6) / "__0_0.distcp", 7)
    assert ckpt.resume_checkpoint(tmp_path, str(old)) == old
    with pytest.raises(CheckpointError, match=r"--resume .*latest: step_000006 is damaged: __0_0.distcp does not "
                                              r"match its sha256 .*; pick another checkpoint"):
        ckpt.resume_checkpoint(tmp_path, str(root / "latest"))
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        ckpt.resume_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def test_an_older_checkpoint_without_checksums_is_checked_for_its_rank_files(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    d = write_step(root, 3, world=2)
    (d / CHECKSUMS).unlink()
    assert ckpt.checkpoint_problems(d) == []
    assert "has no checksums.json" in capsys.readouterr().out
    (d / "trainer" / "rank00001.pt").unlink()
    assert ckpt.checkpoint_problems(d) == ["trainer/rank00001.pt is missing"]


class _Foreign:
    pass


def test_trainer_state_is_read_without_unsafe_unpickling(tmp_path):
    good = tmp_path / "rank00000.pt"
    from engine.data.image_common import TileSpec  # an engine dataclass, as GRPO's buffered samples are

    torch.save({"rng": (3, (1, 2), None), "n": torch.arange(3), "extra": {"samples": [TileSpec(28)]}}, good)
    state = ckpt.load_trainer_state(good)
    assert torch.equal(state["n"], torch.arange(3)) and state["extra"]["samples"] == [TileSpec(28)]
    bad = tmp_path / "rank00001.pt"
    bad.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError) as e:
        ckpt.load_trainer_state(bad)
    assert "cannot be read" in str(e.value) and "weights_only" not in str(e.value)
    foreign = tmp_path / "rank00002.pt"
    torch.save({"obj": _Foreign()}, foreign)
    with pytest.raises(CheckpointError, match="needs classes outside the engine"):
        ckpt.load_trainer_state(foreign)


def test_rotation_never_deletes_what_latest_or_best_name_nor_a_later_timeline(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        write_step(root, step)
    (root / "best").write_text("step_000002")
    (root / "latest").write_text("step_000004")  # resumed from step 4 into a run that had reached step 8
    ckpt._rotate(root, keep=1, current_step=4)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000004", "step_000006", "step_000008"]
    (root / "latest").write_text("step_000008")
    ckpt._rotate(root, keep=1, current_step=8)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000008"]
    ckpt._rotate(root, keep=0, current_step=8)  # 0: keep all
    assert len(list(root.glob("step_*"))) == 2


def test_a_new_run_refuses_a_run_dir_that_holds_another(tmp_path, capsys):
    from engine.train.run_dir import RunDirInUse, prepare_run_dir

    prepare_run_dir(tmp_path, None, False)  # empty: fine
    write_step(tmp_path / "checkpoints", 3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirInUse, match=r"already holds a run \(checkpoints, metrics.jsonl\)\. Continue it with "
                                          r"--resume auto"):
        prepare_run_dir(tmp_path, None, False)
    prepare_run_dir(tmp_path, "auto", False)  # continuing it: fine
    with pytest.raises(RunDirInUse, match="contradict"):
        prepare_run_dir(tmp_path, "auto", True)
    (tmp_path / "notes.txt").write_text("mine")
    prepare_run_dir(tmp_path, None, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the engine's outputs are deleted


def test_init_from_lists_differing_model_fields_unless_allowed(tmp_path):
    from engine.config import load_config, to_dict
    from engine.train.init_from import check_init_from_config

    saved = load_config(REPO / "recipes" / "tiny_cpu_sft.yaml")
    (tmp_path / "meta.json").write_text(json.dumps({"step": 5, "config": to_dict(saved)}))
    ours = load_config(REPO / "recipes" / "tiny_cpu_sft.yaml",
                       ["model.llm.rope_theta=20000", "model.llm.num_layers=2", "model.llm.freeze=true"])
    with pytest.raises(CheckpointError) as e:
        check_init_from_config(tmp_path, ours.model, [])
    msg = str(e.value)
    assert "model.llm.rope_theta: checkpoint 10000.0, config 20000.0" in msg
    assert "model.llm.num_layers: checkpoint 4, config 2" in msg and "freeze" not in msg  # freezing is per stage
    assert "train.init_from_allow=[model.llm.num_layers,model.llm.rope_theta]" in msg
    assert len(check_init_from_config(tmp_path, ours.model, ["model.llm"])) == 2  # a whole section
    with pytest.raises(Exception, match="not a model config field"):
        load_config(None, ["train.init_from_allow=[model.llm.rope_thta]"])


_FULL_DISK_CHILD = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from engine.checkpoint.atomic import atomic_output_dir
from engine.checkpoint.hf_io import CheckpointError
out = Path(sys.argv[1])
try:
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "shard").write_bytes(bytes(4 << 20))
except CheckpointError as e:
    print(e)
    sys.exit(4)
"""


def test_a_full_disk_says_so_and_removes_the_partial_dir(tmp_path):
    """RLIMIT_FSIZE makes a real write fail (EFBIG, as a quota or a full disk would with ENOSPC) in a child process."""
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "ckpt")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "disk full while writing" in proc.stdout and "the partial ckpt.partial was removed" in proc.stdout
    assert list(tmp_path.iterdir()) == []
