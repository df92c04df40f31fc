"""The `best` checkpoint pointer: updated only by a better score of the same metric, kept by rotation,
resolvable like `latest`."""

from __future__ import annotations

import json

import pytest

from engine.train.checkpointing import _rotate, _update_best, best_checkpoint_info, resolve_checkpoint


def _step(root, step):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step}))
    return d.name


@pytest.mark.parametrize("higher,values,best_step", [
    (True, [0.2, 0.5, 0.5, 0.4], 2),    # accuracy: the first of equal maxima
    (False, [2.0, 1.5, 1.7, 1.5], 2),   # validation loss: lower is better
])
def test_best_follows_the_metric_and_survives_rotation(tmp_path, higher, values, best_step):
    root = tmp_path / "checkpoints"
    for step, value in enumerate(values, start=1):
        name = _step(root, step)
        _update_best(root, name, step, ("m", value, higher))
        _rotate(root, keep=1)
    info = best_checkpoint_info(tmp_path)
    assert info["step"] == best_step and info["value"] == values[best_step - 1] and info["metric"] == "m"
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_{best_step:06d}", f"step_{len(values):06d}"]
    assert resolve_checkpoint(root / "best") == root / f"step_{best_step:06d}"


def test_missing_scores_and_new_metrics(tmp_path):
    root = tmp_path / "checkpoints"
    _update_best(root, _step(root, 1), 1, None)  # the step had no metric: nothing recorded
    _update_best(root, _step(root, 2), 2, ("m", float("nan"), True))
    assert best_checkpoint_info(tmp_path) is None
    _update_best(root, _step(root, 3), 3, ("m", 0.9, True))
    _update_best(root, _step(root, 4), 4, ("other", 0.1, True))  # a run resumed with another metric starts over
    assert best_checkpoint_info(tmp_path)["step"] == 4
    (root / "best").write_text("step_000099")
    with pytest.raises(FileNotFoundError, match="step_000099"):
        resolve_checkpoint(root / "best")


def test_export_of_a_pointer_to_a_missing_checkpoint_names_it(tmp_path):
    from engine.checkpoint.convert import mcore_to_hf
    from engine.checkpoint.hf_io import CheckpointError

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "best").write_text("step_000042")
    with pytest.raises(CheckpointError, match="best names step_000042"):
        mcore_to_hf(root / "best", tmp_path / "hf", "internvl_chat", show_progress=False)
    assert not (tmp_path / "hf").exists()
