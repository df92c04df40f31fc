"""Draw loss / reward curves from a run's metrics.jsonl to a PNG.

    python tools/plot_metrics.py runs/demo_sft/metrics.jsonl --out runs/demo_sft/curves.png
    python tools/plot_metrics.py A/metrics.jsonl B/metrics.jsonl --keys loss reward_mean --out cmp.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_KEYS = ("loss", "valid_loss", "reward_mean", "effective_sample_ratio", "critical_token_entropy", "lr")


def read(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not a JSON line ({e}); is this a metrics.jsonl?") from None
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", type=Path)
    ap.add_argument("--keys", nargs="*", default=None, help=f"metrics to draw (default: those present of {DEFAULT_KEYS})")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {str(p): read(p) for p in args.metrics}
    present = {k for rows in runs.values() for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    keys = args.keys or [k for k in DEFAULT_KEYS if k in present]
    missing = [k for k in keys if k not in present]
    if missing:
        raise SystemExit(f"no numeric values for {missing} in {list(runs)}; present: {sorted(present)}")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=Path(name).parent.name or name)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({', '.join(keys)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
