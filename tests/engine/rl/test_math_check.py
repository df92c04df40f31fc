"""math-verify under our own time bound: worker processes (killed on timeout) or a thread deadline,
usable from non-main threads (math-verify's own signal.alarm timeouts are off)."""

import threading
import time

import pytest

from engine.rl.math_check import MathVerifier, wrap_math

PAIRS = [  # (pred, gold, equal?)
    (r"\frac{32}{3}\pi", r"32\pi/3", True),       # gold bare: wrapped in $...$ by us
    ("0.5", r"\frac{1}{2}", True),
    (r"\{3, 1, 2\}", r"\{1,2,3\}", True),
    ("(0, 1]", "(0,1]", True),
    ("[0,1]", "(0,1]", False),
    ("3.14", r"\pi", False),
]


def test_wrap_math():
    assert wrap_math(r"32\pi/3") == r"$32\pi/3$"
    assert wrap_math(r"$x$") == "$x$" and wrap_math(r"\boxed{2}") == r"\boxed{2}"


def test_process_backend_from_a_worker_thread():
    results = []
    with MathVerifier(timeout_s=30.0, workers=2) as mv:
        t = threading.Thread(target=lambda: results.extend(mv.check_many([(p, g) for p, g, _ in PAIRS])))
        t.start()
        t.join()
    assert [v for v, _ in results] == ["equal" if eq else "different" for _, _, eq in PAIRS]


def test_process_backend_kills_a_runaway_check_and_keeps_going():
    # 9^(9^(9^9)) vs 3 makes sympy evaluate a gigantic power: it never finishes (and holds the GIL)
    with MathVerifier(timeout_s=2.0, workers=1) as mv:
        t0 = time.monotonic()
        verdicts = mv.check_many([("9^{9^{9^{9}}}", "3"), ("2", "2"), ("1/2", "0.5")])
        elapsed = time.monotonic() - t0
        assert [v for v, _ in verdicts] == ["timeout", "equal", "equal"]
        assert mv.restarts == 1
        assert elapsed < 60  # bounded: without the kill this would not return at all


def test_thread_backend_from_a_worker_thread():
    mv = MathVerifier(timeout_s=30.0, backend="thread")
    out = []
    t = threading.Thread(target=lambda: out.extend(mv.check_many([(p, g) for p, g, _ in PAIRS[:3]])))
    t.start()
    t.join()
    assert [v for v, _ in out] == ["equal"] * 3


def test_bad_settings():
    with pytest.raises(ValueError, match="backend"):
        MathVerifier(backend="signal")
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)


def test_a_worker_that_dies_gives_error_and_is_replaced():
    with MathVerifier(timeout_s=60.0, workers=1) as mv:
        def kill_when_busy():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if mv._workers and mv._workers[0].item is not None:
                    mv._workers[0].proc.kill()  # e.g. the OOM killer
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        verdicts = mv.check_many([("9^{9^{9^{9}}}", "3"), ("2", "2")])
        killer.join()
        assert [v for v, _ in verdicts] == ["error", "equal"] and mv.restarts == 1
