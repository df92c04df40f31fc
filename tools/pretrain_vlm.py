"""Train the VLM: `torchrun --nproc_per_node=N tools/pretrain_vlm.py --config recipes/X.yaml [key=value ...]`.

Thin: parse, build the config, hand over to engine.train. The stage comes from `train.stage`.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    args = ap.parse_args(argv)

    from engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from engine.train.stages import run_stage

    return run_stage(cfg, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
