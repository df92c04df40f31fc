"""`make demo`: generate the visual-reasoning set, then train the tiny recipe on 2 CPU processes.

Prints the loss per step (from the run's metrics.jsonl) and a first-vs-last summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--run-dir", default="runs/demo_sft")
    args = ap.parse_args()

    data = REPO / "data" / "generated"
    if not (data / "sft.jsonl").exists():
        sh([sys.executable, "tools/make_demo_data.py", "--out", str(data), "--num", "600", "--seed", "0"])
    run_dir = REPO / args.run_dir
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    sh([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_port=29417",
        "tools/pretrain_vlm.py", "--config", "recipes/tiny_cpu_sft.yaml",
        f"train.max_steps={args.steps}", f"train.run_dir={args.run_dir}"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print("\nstep  loss     lr        tokens/s")
    for r in records:
        print(f"{r['step']:4d}  {r['loss']:.4f}  {r['lr']:.2e}  {r['tokens_per_s']:8.0f}")
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    print(f"\nmean loss of the first 3 steps {first:.3f} -> last 3 steps {last:.3f} "
          f"({'decreasing' if last < first else 'NOT decreasing'}); metrics: {run_dir / 'metrics.jsonl'}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
