#!/bin/bash
# One-shot GPU check, sized for a single <= 10-minute call on one H100/H200:
#
#   tools/gpu_check.sh OUT_DIR            # on the GPU host (wheels from .whl/: tools/fetch_gpu_wheels.sh)
#   tools/gpu_check.sh OUT_DIR --dry-run  # the same sequence on the CPU at tiny shapes (CI: tests/tools/test_gpu_check.py)
#
# Steps (each under its own time limit and a total deadline; a failing step is recorded and the next one runs):
#   1. install   wheels from .whl/ into a private --target dir (the host has no package index; skipped in --dry-run)
#   2. env       device, torch / triton / megatron versions                            -> env.json
#   3. data      the generated demo set (tools/make_demo_data.py)
#   4. tiny_sft  the tiny SFT recipe for real on 1 GPU in bf16, local spec (SDPAttention, packed THD rows)
#                                                                                      -> tiny_sft.json + metrics
#   5. packed    packed-vs-unpacked losses/gradients on the device (+ bf16 varlen flash) -> packed_test.xml
#   6. kernels   pytest tests/kernels -m gpu                                           -> kernels_gpu.xml
#   7. bench_kernels  tools/bench_kernels.py --tokens 16384 --vocab 152064 --tp 1      -> bench_kernels.json
#   8. bench_train_step  2 Qwen2.5-32B layers, 16k tokens, bf16: step time and MFU     -> bench_train_step.json
# Every step's log is OUT_DIR/<step>.log; OUT_DIR/summary.json lists each step's exit code and seconds.
set -uo pipefail

OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
# total wall-clock budget in seconds: a device call is limited to 10 minutes, keep a margin for the transfers
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$(date +%s)
SUMMARY="$OUT/steps.jsonl"
: > "$SUMMARY"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# A single-node check: a rendezvous inherited from the caller (a Slurm job, a test process that already holds
# MASTER_PORT) would make every step's process group bind that same port.
unset MASTER_ADDR MASTER_PORT RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE

run_step() {  # run_step NAME LIMIT_S CMD...: one step under min(LIMIT_S, what is left of the budget)
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local rc=124 t0
  t0=$(date +%s)
  if ((left < 10)); then
    echo "[gpu_check] $name: skipped, the ${BUDGET}s budget is spent" | tee "$OUT/$name.log"
  else
    ((limit > left)) && limit=$left
    echo "[gpu_check] $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
  fi
  local dt=$(($(date +%s) - t0))
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt}" >> "$SUMMARY"
  echo "[gpu_check] $name: rc=$rc in ${dt}s"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
}

if ((DRY)); then
  export PYTHONPATH="$REPO"
  SITE=""
  DTYPE=float32; SFT_STEPS=3; DEMO_NUM=40
  KERNEL_BENCH=(--tiny --no-compile --reps 1 --warmup 0 --impls triton torch_eager)
  STEP_BENCH=(--dry-run)
else
  SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  export PYTHONPATH="$SITE:$REPO"
  DTYPE=bfloat16; SFT_STEPS=30; DEMO_NUM=200
  KERNEL_BENCH=(--tokens 16384 --vocab 152064 --tp 1 --markdown)
  STEP_BENCH=()
  run_step install 120 bash -c "ls .whl/*.whl && $PY -m pip install -q --no-index --no-deps --no-compile --target '$SITE' .whl/*.whl"
fi

run_step env 60 "$PY" - "$OUT/env.json" <<'EOF'
import json, sys, torch
from importlib import metadata
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None}
for dist in ("triton", "transformers", "megatron-core", "transformer-engine", "psutil", "pillow"):
    try:  # installed versions, without importing them (megatron's import alone takes seconds)
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[dist] = "not installed"
try:  # SDPAttention's one-kernel packed path on the GPU (else one SDPA call per sample)
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    info["varlen_attn"] = True
except ImportError as e:
    info["varlen_attn"] = f"not importable: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF

run_step data 120 "$PY" tools/make_demo_data.py --out "$OUT/demo" --num "$DEMO_NUM" --seed 0

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run_step tiny_sft 240 "$PY" -m torch.distributed.run --nproc_per_node=1 --master_port="$PORT" tools/pretrain_vlm.py \
  --config recipes/tiny_cpu_sft.yaml model.params_dtype="$DTYPE" model.transformer_impl=local \
  data.train_path="$OUT/demo/sft.jsonl" train.run_dir="$OUT/tiny_sft" train.max_steps="$SFT_STEPS" \
  train.global_batch_size=8 train.log_interval=1
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
path = out / "tiny_sft" / "metrics.jsonl"
recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
summary = {"steps": len(recs), "first_loss": recs[0]["loss"] if recs else None,
           "last_loss": recs[-1]["loss"] if recs else None,
           "loss_went_down": bool(recs) and recs[-1]["loss"] < recs[0]["loss"],
           "mfu": recs[-1].get("mfu") if recs else None, "pack_fill": recs[-1].get("pack_fill") if recs else None,
           "memory_gb": recs[-1].get("memory_gb") if recs else None,
           "step_time_s": recs[-1].get("step_time_s") if recs else None}
(out / "tiny_sft.json").write_text(json.dumps(summary, indent=1))
EOF

run_step packed 180 "$PY" -m pytest -q -p no:cacheprovider tests/engine/model/test_packed_equivalence.py \
  tests/engine/model/test_attention.py --junitxml="$OUT/packed_test.xml"

run_step kernels 240 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m gpu --junitxml="$OUT/kernels_gpu.xml"

run_step bench_kernels 240 "$PY" tools/bench_kernels.py "${KERNEL_BENCH[@]}" --out "$OUT/bench_kernels.json"

run_step bench_train_step 240 "$PY" tools/bench_train_step.py "${STEP_BENCH[@]}" --out "$OUT/bench_train_step.json"

"$PY" - "$OUT" "$DRY" "$(($(date +%s) - START))" <<'EOF'
import json, sys
from pathlib import Path
out, dry, total = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
summary = {"dry_run": dry, "total_seconds": total, "ok": all(s["rc"] == 0 for s in steps), "steps": steps,
           "env": load("env.json"), "tiny_sft": load("tiny_sft.json"), "bench_train_step": load("bench_train_step.json")}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({"ok": summary["ok"], "total_seconds": total, "failed": [s["step"] for s in steps if s["rc"]]}))
EOF
