"""torchrun with pre-emption-safe SIGTERM: `python tools/launch.py [torchrun flags] tools/pretrain_vlm.py ...`.

Takes exactly torchrun's arguments. Two differences, both for Slurm:
- SIGTERM (pre-emption, the time limit; Slurm sends it to every process of the step): torchrun's agent
  forwards it, waits 30 s (--shutdown-timeout), SIGKILLs the workers, which may still be writing their
  checkpoint, and exits 1 even when they finished cleanly. Here the agent only forwards SIGTERM to the
  workers and keeps waiting: they save and exit 0, and so does this launcher.
- When a worker fails, the exit code is the first failed worker's (tools/pretrain_vlm.py: 2 config, 3 data,
  4 checkpoint, 5 diverged; docs/reliability.md), with one line naming it, instead of torchrun's 1 and its
  error report.
"""

from __future__ import annotations

import signal
import sys

import psutil

# torchrun's default list without SIGTERM, which is handled here (SIGINT still stops everything at once)
SIGNALS_LEFT_TO_TORCHRUN = "SIGINT,SIGHUP,SIGQUIT"


def _forward_sigterm(signum, frame) -> None:
    for child in psutil.Process().children():  # the agent's workers (torchrun starts them as direct children)
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    args.signals_to_handle = SIGNALS_LEFT_TO_TORCHRUN
    signal.signal(signal.SIGTERM, _forward_sigterm)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1  # < 0: killed by signal -exitcode
        how = f"exit code {failure.exitcode}" if failure.exitcode > 0 else f"signal {-failure.exitcode}"
        print(f"launch: rank {rank} failed first ({how}); its error is above", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
