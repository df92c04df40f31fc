"""Compile every kernel variant for an H100 (sm_90) without a GPU, as a subprocess of the tests.

Run with TRITON_INTERPRET=0 (the test does this): Triton then lowers each kernel through
TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas, which catches compiled-mode errors the
interpreter never sees (type mismatches in loop-carried values, constexpr branches, pointer types).
Prints one JSON line per variant: name, ok, error, and ptxas' register / spill report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 default, set to silence its warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kernels import grpo_loss as grpo  # noqa: E402
from kernels import logprob_entropy as lpe  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200: sm_90, warp size 32
FP32_SCALARS = {"temperature", "clip_low", "clip_high", "dual_c", "kl_coef"}
_TL = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def signature(fn, constexprs: dict, logits_dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("x_ptr", "dx_ptr"):
            sig[name] = f"*{_TL[logits_dtype]}"
        elif name == "tgt_ptr":
            sig[name] = "*i64"
        elif name == "flags_ptr":
            sig[name] = "*i8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def ptxas_report(ptx: str) -> str:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # Triton 3.9 emits PTX 9.x, which only the bundled "ptxas-blackwell" (CUDA 13) accepts
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True)
    return " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads", out.stderr))


def variants():
    _, bv = lpe.block_sizes(152064)
    common = dict(IGNORE=lpe.IGNORE_INDEX, BLOCK_T=lpe.ROWS_PER_PROGRAM, BLOCK_V=bv)
    for dt in ("bfloat16", "float16", "float32"):
        for fin in (True, False):
            yield f"lpe_fwd[{dt},finalize={fin}]", lpe._logprob_entropy_fwd_kernel, dict(FINALIZE=fin, **common), dt
        for g_lp, g_ent, dtemp in ((True, True, True), (True, False, False), (False, True, False)):
            yield (f"lpe_bwd[{dt},g_lp={g_lp},g_ent={g_ent},dtemp={dtemp}]", lpe._logprob_entropy_bwd_kernel,
                   dict(HAS_G_LP=g_lp, HAS_G_ENT=g_ent, COMPUTE_DTEMP=dtemp, **common), dt)
    grpo_common = dict(LR_CLAMP=grpo.LOG_RATIO_CLAMP, KL_MAX=grpo.K3_MAX, IGNORE=lpe.IGNORE_INDEX)
    for from_logits in (True, False):
        for dual, ref, kl in ((True, True, 3), (False, True, 1), (False, True, 2), (False, False, 3)):
            blocks = (dict(BLOCK_T=lpe.ROWS_PER_PROGRAM, BLOCK_V=bv) if from_logits
                      else dict(BLOCK_T=grpo.ELEMENTWISE_BLOCK, BLOCK_V=16))
            yield (f"grpo_fwd[from_logits={from_logits},dual={dual},ref={ref},k{kl}]", grpo._grpo_fwd_kernel,
                   dict(FROM_LOGITS=from_logits, HAS_DUAL=dual, HAS_REF=ref, KL_TYPE=kl, **grpo_common, **blocks),
                   "bfloat16")


def main():
    if lpe.INTERPRET:
        raise SystemExit("run with TRITON_INTERPRET=0: this compiles for a GPU target")
    for name, fn, constexprs, dt in variants():
        try:
            src = ASTSource(fn, signature(fn, constexprs, dt), constexprs=constexprs)
            k = triton.compile(src, target=TARGET, options={"num_warps": lpe.NUM_WARPS})
            ok = bool(k.asm.get("cubin"))
            print(json.dumps(dict(name=name, ok=ok, error="", ptxas=ptxas_report(k.asm["ptx"]))), flush=True)
        except Exception as e:  # noqa: BLE001 - report every variant, the test fails on any error
            print(json.dumps(dict(name=name, ok=False, error=f"{type(e).__name__}: {e}"[:2000], ptxas="")),
                  flush=True)


if __name__ == "__main__":
    main()
