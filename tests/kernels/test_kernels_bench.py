"""tools/bench_kernels.py --tiny runs on CPU and writes the rows and fields the docs promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench_kernels.py"
FIELDS = {"op", "impl", "mode", "tokens", "vocab", "tp", "v_shard", "hidden", "dtype", "status", "reason", "time_ms",
          "peak_mem_mb", "mem_method", "bytes_moved", "gbps", "roofline_frac", "flops", "tflops", "speedup_vs_eager",
          "mem_ratio_vs_eager", "ignore_frac"}
LINEAR_OPS = ("linear_logprob_entropy", "linear_grpo_loss")


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "roof" in proc.stdout  # the printed table
    return json.loads(out.read_text())


def test_bench_tiny_rows_and_fields(tmp_path):
    result = _run(tmp_path, "--no-compile", "--reps", "1", "--warmup", "0")
    meta, rows = result["meta"], result["rows"]
    assert meta["peak_gbps"] > 0 and meta["bytes_model"] and meta["triton_interpreter"] in (True, False)
    # 3 tiny shapes x 3 modes x (2 logits ops x 5 implementations + 2 linear ops x 7 implementations)
    assert len(rows) == 3 * 3 * (2 * 5 + 2 * 7)
    for row in rows:
        assert FIELDS <= row.keys(), FIELDS - row.keys()
        assert row["v_shard"] * row["tp"] == row["vocab"]
    measured = [r for r in rows if r["impl"] in ("triton", "triton_inplace", "fused_linear", "torch_eager")]
    assert {r["impl"] for r in measured if r["op"] in LINEAR_OPS} == {"triton", "triton_inplace", "fused_linear",
                                                                      "torch_eager"}
    assert {r["status"] for r in measured} == {"ok"}
    for r in measured:
        assert r["time_ms"] > 0 and r["gbps"] > 0 and r["roofline_frac"] > 0
        factor = {"forward": 1, "backward": 2, "full": 3}[r["mode"]]
        assert r["bytes_moved"] == factor * r["tokens"] * r["v_shard"] * 2  # bf16
        assert r["mem_method"] in ("cuda_max_memory_allocated", "torch_profiler_cpu_alloc_events")
        if r["op"] in LINEAR_OPS:
            assert r["flops"] == 2 * factor * r["tokens"] * r["v_shard"] * r["hidden"] and r["tflops"] > 0
        else:
            assert r["hidden"] is None and r["flops"] is None
    for r in rows:
        if r["impl"] == "torch_compile":
            assert r["status"] == "skipped" and r["reason"] == "--no-compile"
        if r["impl"] in ("liger", "verl"):  # ok where installed; otherwise a reason, never a crash
            assert r["status"] == "ok" or r["reason"], r


@pytest.mark.slow
def test_bench_tiny_torch_compile_backward(tmp_path):
    """torch.compile of the reference, including the backward-only timing (all 3 tiny shapes)."""
    rows = _run(tmp_path, "--ops", "grpo_loss", "--impls", "torch_compile", "--modes", "backward")["rows"]
    assert len(rows) == 3
    for r in rows:
        assert r["status"] == "ok" or r["reason"].startswith("torch.compile failed"), r
