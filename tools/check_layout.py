"""Check a recipe's parallel layout at its real world size, on one CPU process, without memory.

    python tools/check_layout.py --config recipes/r1v2_sft.yaml --world-size 512 [overrides...] [--json out.json]

Every pipeline stage is built on the meta device under a fake process group of that world size
(engine/parallel/meta_layout.py); prints layers per stage and the static memory per GPU, exits 1 on a problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, action="append", help="recipe YAML (repeat for several)")
    ap.add_argument("--world-size", required=True, type=int, action="append", help="GPUs, one per --config")
    ap.add_argument("--json", default="", help="write the reports here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if len(args.config) != len(args.world_size):
        ap.error("give one --world-size per --config")

    from engine.config import load_config
    from engine.parallel.meta_layout import check_layout

    reports, ok = [], True
    for path, world in zip(args.config, args.world_size):
        report = check_layout(load_config(path, args.overrides), world, recipe=path)
        ok &= report.ok
        reports.append(dataclasses.asdict(report) | {"max_static_gib": report.max_static_gib,
                                                      "total_params": report.total_params})
        print(f"{path}: world {world} = TP {report.tp} x PP {report.pp} x DP {report.dp}, "
              f"{report.total_params / 1e9:.2f}B parameters")
        for s in report.stages:
            print(f"  stage {s.stage} (rank {s.rank}): layers {s.layers[0]}-{s.layers[-1]}, vision={s.has_vision}, "
                  f"output={s.has_output_layer}, {s.params / 1e9:.3f}B params/GPU, static {s.static_gib:.1f} GiB/GPU")
            for problem in s.problems:
                print(f"    PROBLEM: {problem}")
        for problem in report.problems:
            print(f"  PROBLEM: {problem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
