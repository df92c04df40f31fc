"""Per-step metrics: JSON lines in <run_dir>/metrics.jsonl, TensorBoard scalars, a progress bar (rank 0)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._bar_args = dict(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint (they are redone). A line that is
        not JSON (the half-written last line of a killed run) is dropped with a warning."""
        if not self.path.exists():
            return
        kept, torn = [], []
        for lineno, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn.append(lineno)
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        if torn:
            log.warning("%s: dropped %d line(s) that are not JSON (line %s; the half-written last line of a killed "
                        "run)", self.path, len(torn), ", ".join(map(str, torn)))
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.bar is None:  # created at the first step so start-up messages print above it
            self.bar = tqdm(**self._bar_args)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record.get('lr', 0):.2e}")

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
