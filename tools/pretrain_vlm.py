"""Train the VLM: `torchrun --nproc_per_node=N tools/pretrain_vlm.py --config recipes/X.yaml [key=value ...]`.

Thin: parse, build the config, hand over to engine.train. The stage comes from `train.stage`.
`python tools/launch.py` instead of `torchrun` makes a SIGTERM (Slurm pre-emption) end with exit 0 after
the checkpoint (docs/reliability.md). Exit codes: 0 done (also after a SIGTERM checkpoint or early
stopping), 2 config / command line / run dir in use, 3 data, 4 checkpoint (damaged, mismatched, disk full),
5 too many non-finite steps in a row, 1 anything else. An error prints one line (rank 0 for errors every
rank shares); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Known-harmless noise from torch/megatron on every step (deprecated collective names in megatron-core
# 0.16.1, and megatron's schedule reading `.grad` of its own output tensors).
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    ap.add_argument("--resume", default=None, help="'auto' = continue from <run_dir>/checkpoints/latest, or a checkpoint dir")
    ap.add_argument("--overwrite", action="store_true",
                    help="start a new run in a run dir that holds another: delete its checkpoints and metrics first")
    ap.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    args = ap.parse_args(argv)
    try:
        from engine.config import load_config
        from engine.train.stages import run_stage

        return run_stage(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    except BaseException as e:  # noqa: BLE001 - every error ends in one line and an exit code (--debug: traceback)
        if args.debug or isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        from engine.train.errors import exit_code_and_message

        code, message, everywhere = exit_code_and_message(e)
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or everywhere:
            prefix = f"[rank {rank}] " if everywhere and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
