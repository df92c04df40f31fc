"""A conversion's output may not be, contain or sit inside any of its inputs (issue 13 item 11)."""

from __future__ import annotations

import pytest

from engine.checkpoint.convert import refuse_overlap
from engine.checkpoint.hf_io import CheckpointError


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt2").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    return tmp_path


@pytest.mark.parametrize("out,match", [
    ("ckpt", "is the checkpoint"),  # mcore-to-hf --out <its --ckpt>
    ("ckpt/sub", "inside the checkpoint"),
    ("ckpt/new", "inside the checkpoint"),  # not there yet: still inside
    (".", "contains the checkpoint"),
    ("link", "is the checkpoint"),  # a symlink to the input
    ("link/new", "inside the checkpoint"),
    ("ckpt/../ckpt", "is the checkpoint"),
])
def test_overlapping_outputs_are_refused(tree, out, match):
    with pytest.raises(CheckpointError, match=match) as e:
        refuse_overlap(tree / out, {"checkpoint": tree / "ckpt"})
    assert "choose an output directory outside every input" in str(e.value)


def test_the_writers_staging_names_count_too(tree):
    # <out>.partial is removed before writing: converting from X.partial into X would delete the input
    (tree / "x.partial").mkdir()
    with pytest.raises(CheckpointError, match="stages in"):
        refuse_overlap(tree / "x", {"--hf-dir": tree / "x.partial"})


def test_an_input_given_through_a_symlink_is_resolved(tree):
    with pytest.raises(CheckpointError, match=r"is the --hf-dir .*link \(= .*ckpt\)"):
        refuse_overlap(tree / "ckpt", {"--hf-dir": tree / "link"})


@pytest.mark.parametrize("out", ["ckpt2", "ckpt_export", "other/ckpt"])
def test_separate_directories_are_fine(tree, out):
    refuse_overlap(tree / out, {"checkpoint": tree / "ckpt", "tokenizer": None})  # 'ckpt2' only shares a prefix
