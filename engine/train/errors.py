"""How a training run's errors end: an exit code per kind and one message (tools/pretrain_vlm.py).

Codes: 2 config / command line / run dir in use, 3 data, 4 checkpoint (damaged, mismatched, disk full),
5 too many non-finite steps in a row, 1 anything else. Errors that every rank meets the same way (config,
checkpoint, a missing file) are printed by rank 0 only; an error one rank meets on its own (a bad sample in
its shard, an unexpected exception) is printed by that rank.
"""

from __future__ import annotations

# Data errors about the whole file (every rank has them): printed once.
_FILE_LEVEL_DATA = {"missing_file", "no_samples"}


def exit_code_and_message(e: BaseException) -> tuple[int, str, bool]:
    """(exit code, one-line message, whether every failing rank should print it)."""
    from engine.checkpoint.hf_io import CheckpointError
    from engine.config.base import ConfigError
    from engine.data.errors import DataError
    from engine.train.run_dir import RunDirInUse
    from engine.train.trainer import TooManyBadSteps

    if isinstance(e, ConfigError):
        return 2, f"config: {e}", False
    if isinstance(e, RunDirInUse):
        return 2, f"{e}", False
    if isinstance(e, DataError):
        return 3, f"data: {e}", e.reason not in _FILE_LEVEL_DATA
    if isinstance(e, CheckpointError):
        return 4, f"checkpoint: {e}", False
    if isinstance(e, TooManyBadSteps):
        return 5, f"{e}", False
    from engine.checkpoint.atomic import short_error

    first_line = short_error(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return 1, f"{first_line} (run with --debug for the traceback)", True
