"""math-verify equivalence, bounded in time by us (math-verify's own signal.alarm timeouts are
disabled: they only work in the main thread).

backend="process" (default): a small pool of worker subprocesses; a check that runs past
`timeout_s` gets its worker killed and replaced and counts as a timeout. Safe from any thread, and a
runaway sympy computation (e.g. 9^(9^(9^9)), which holds the GIL) cannot stall the trainer.
backend="thread": a daemon thread per check and a deadline on the wait; only the caller's wait is
bounded, a runaway computation keeps running in the background — for environments where
subprocesses cannot be started. This module imports no torch so the workers start fast.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from typing import Literal

Verdict = Literal["equal", "different", "timeout", "error"]
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds engine/
_STARTUP_TIMEOUT_S = 120.0  # a spawned worker imports math-verify + sympy: ~1 s idle, much more on a loaded box


def wrap_math(text: str) -> str:
    """math-verify needs delimiters: a bare '32\\pi/3' parses to 32. Add `$...$` unless already there."""
    t = text.strip()
    if t.startswith("$") or "\\boxed" in t or t.startswith("\\(") or t.startswith("\\["):
        return t
    return f"${t}$"


def verify_equivalent(pred: str, gold: str) -> bool:
    """math-verify with its timeouts off; call only under a time bound (MathVerifier does)."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silence "timeout is disabled" warnings
    gold_parsed = parse(wrap_math(gold), parsing_timeout=None)
    pred_parsed = parse(wrap_math(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _worker_main() -> None:
    """`python -m engine.rl.math_check`: JSON lines in on stdin, JSON lines out on stdout."""
    verify_equivalent("1", "1")  # import math-verify / sympy / antlr now, so the first real check's clock is fair
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            verdict, msg = ("equal" if verify_equivalent(req["pred"], req["gold"]) else "different"), ""
        except Exception as e:  # noqa: BLE001 - any parser failure is a counted "error" verdict
            verdict, msg = "error", f"{type(e).__name__}: {e}"
        out.write(json.dumps({"i": req["i"], "v": verdict, "m": msg}) + "\n")
        out.flush()


class _Worker:
    """One `python -m engine.rl.math_check` subprocess. A plain subprocess, not multiprocessing: it does not
    re-import the trainer's __main__ (torch, megatron) and needs no `if __name__ == "__main__"` guard."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.rl.math_check"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.item: int | None = None
        self.started = 0.0
        ready = self.read_line(deadline=time.monotonic() + _STARTUP_TIMEOUT_S)
        if ready is None or not ready.get("ready"):
            self.kill()
            raise RuntimeError(f"math-verify worker did not start within {_STARTUP_TIMEOUT_S}s; check that "
                               f"`{sys.executable} -m engine.rl.math_check` runs (math-verify[antlr4_13_2] installed)")

    def send(self, item: int, pred: str, gold: str) -> None:
        self.item, self.started = item, time.monotonic()
        self.proc.stdin.write((json.dumps({"i": item, "pred": pred, "gold": gold}) + "\n").encode())

    def take_line(self) -> dict | None:
        if b"\n" not in self.buffer:
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def fill(self) -> bool:
        """Read what is available; False at EOF (the worker died)."""
        chunk = os.read(self.fd, 1 << 16)
        self.buffer += chunk
        return bool(chunk)

    def read_line(self, deadline: float) -> dict | None:
        while (msg := self.take_line()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0] or not self.fill():
                return None
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # EOF: the worker's loop ends
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class MathVerifier:
    """check_many([(pred, gold), ...]) -> verdicts, each in 'equal' | 'different' | 'timeout' | 'error'."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, backend: Literal["process", "thread"] = "process"):
        if timeout_s <= 0 or workers < 1:
            raise ValueError(f"MathVerifier needs timeout_s > 0 and workers >= 1 (got {timeout_s}, {workers})")
        if backend not in ("process", "thread"):
            raise ValueError(f"MathVerifier backend must be 'process' or 'thread', got {backend!r}")
        self.timeout_s, self.num_workers, self.backend = timeout_s, workers, backend
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one check_many at a time per verifier (workers are shared)
        self.restarts = 0

    # -- process backend -------------------------------------------------------------------------
    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker()
        self.restarts += 1

    def _check_process(self, pairs: list[tuple[str, str]]) -> list[tuple[Verdict, str]]:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker())
        results: list[tuple[Verdict, str] | None] = [None] * len(pairs)
        pending = list(range(len(pairs)))[::-1]
        while pending or any(w.item is not None for w in self._workers):
            for i, w in enumerate(self._workers):
                if w.item is None and pending:
                    if w.proc.poll() is not None:  # died since last use
                        self._replace(i)
                        w = self._workers[i]
                    item = pending.pop()
                    w.send(item, *pairs[item])
            busy = [w for w in self._workers if w.item is not None]
            next_deadline = min(w.started + self.timeout_s for w in busy)
            readable = select.select([w.fd for w in busy], [], [], max(0.0, next_deadline - time.monotonic()))[0]
            for i, w in enumerate(self._workers):
                if w.item is None:
                    continue
                if w.fd in readable and not w.fill():  # EOF: the worker crashed on this input
                    results[w.item] = ("error", "math-verify worker died")
                    self._replace(i)
                    continue
                msg = w.take_line()
                if msg is not None:
                    results[msg["i"]] = (msg["v"], msg["m"])
                    w.item = None
                elif time.monotonic() - w.started >= self.timeout_s:
                    results[w.item] = ("timeout", f"no result within {self.timeout_s}s")
                    self._replace(i)
        return results  # type: ignore[return-value]

    # -- thread backend --------------------------------------------------------------------------
    def _check_thread(self, pairs: list[tuple[str, str]]) -> list[tuple[Verdict, str]]:
        results: list[tuple[Verdict, str]] = []
        for pred, gold in pairs:
            box: list[tuple[Verdict, str]] = []

            def run(pred=pred, gold=gold, box=box):
                try:
                    box.append(("equal" if verify_equivalent(pred, gold) else "different", ""))
                except Exception as e:  # noqa: BLE001
                    box.append(("error", f"{type(e).__name__}: {e}"))

            t = threading.Thread(target=run, daemon=True, name="math-verify")
            t.start()
            t.join(self.timeout_s)
            results.append(box[0] if box else ("timeout", f"no result within {self.timeout_s}s"))
        return results

    def check_many(self, pairs: list[tuple[str, str]]) -> list[tuple[Verdict, str]]:
        """Verdict and message per (pred, gold) pair, in order."""
        if not pairs:
            return []
        with self._lock:
            return self._check_process(pairs) if self.backend == "process" else self._check_thread(pairs)

    def close(self) -> None:
        for w in self._workers:
            w.close()
        self._workers = []

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


if __name__ == "__main__":
    _worker_main()
