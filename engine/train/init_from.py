"""`train.init_from`: a stage starts from an earlier checkpoint only when the model configs agree.

The checkpoint's stored model config (meta.json of a training checkpoint, engine_checkpoint.json of a
converted one) is compared field by field with this run's, as `mcore_io.load_model` does for conversions
(`config_differences`: the freeze flags, transformer_impl and params_dtype may differ). Any other
difference is an error listing every field with both values, unless `train.init_from_allow` names it.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.hf_io import CheckpointError


def check_init_from_config(path: str | Path, model_cfg, allowed: list[str]) -> list[str]:
    """Raises CheckpointError on a difference not in `allowed` (a field, or a section such as model.vision);
    returns the allowed differences, to report."""
    from engine.checkpoint.mcore_io import config_differences, read_meta

    diffs = config_differences(read_meta(path)["model_config"], model_cfg)

    def ok(line: str) -> bool:
        key = line.split(":", 1)[0]
        return any(key == f or key.startswith(f + ".") for f in allowed)

    refused = [d for d in diffs if not ok(d)]
    if refused:
        keys = ",".join(d.split(":", 1)[0] for d in refused)
        raise CheckpointError(
            f"train.init_from={path}: the checkpoint's model config differs from this run's:\n  " + "\n  ".join(refused)
            + f"\nfix the recipe, or if these differences are intended (e.g. a longer context), set "
              f"train.init_from_allow=[{keys}]")
    return diffs
