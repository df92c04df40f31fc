"""Microbenchmark the fused kernels against torch eager, torch.compile, Liger-Kernel and verl.

    .venv/bin/python tools/bench_kernels.py --tiny --out bench.json            # CPU smoke (seconds)
    python tools/bench_kernels.py --tokens 16384 --vocab 152064 --tp 1 --out h100.json   # on a GPU

For each (op, shape, implementation, mode in forward / backward / full) it reports time, peak memory,
achieved GB/s under a bytes-moved model and the fraction of the device's memory-bandwidth roofline.

Bytes-moved model (the minimum any implementation must move; [T]-sized vectors are < 0.01% at 152k
vocab and are left out): forward reads the logits once (T * V_shard * itemsize); backward reads the
logits and writes dlogits (2x); full = 3x. GB/s = bytes / time; roofline fraction = GB/s / peak GB/s.

Vocab-parallel shapes (tp > 1) time one rank's [T, V/tp] shard without the all-reduce (the kernels'
per-rank work; the [T]-sized collectives are not part of this benchmark).

Time: CUDA events (median of --reps after --warmup) on GPU; time.perf_counter on CPU, where the
Triton kernels run in the interpreter, so CPU times say nothing about GPU speed (smoke only).
Peak memory: torch.cuda.max_memory_allocated above the inputs on GPU; on CPU the peak process RSS
above the starting RSS, sampled every 1 ms by a psutil thread (approximate: freed-and-reused heap
pages are not seen again). The JSON names the method used in each row ("mem_method").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import kernels  # noqa: E402  (sets TRITON_INTERPRET=1 when there is no CUDA)
from kernels import (  # noqa: E402
    fused_grpo_loss,
    fused_logprob_entropy,
    grpo_loss_reference,
    logprob_entropy_reference,
)

# ----------------------------------------------------------------------------------------------
# Shape registry
# ----------------------------------------------------------------------------------------------
QWEN25_VOCABS = (152064, 151936)  # Qwen2.5 7B+/72B padded vocab, and the 0.5B-3B one
REAL_TOKENS = (4096, 16384, 65536)  # packed tokens per micro-batch: 4k, 16k, 64k
REAL_TP = (1, 2, 8)
TINY_SHAPES = ((64, 1000, 1), (64, 1000, 2), (48, 1537, 1))  # (T, V, tp): odd V, seconds on CPU

PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}
"""HBM bandwidth from the vendors' datasheets (H100 SXM 3.35 TB/s, H200 4.8 TB/s, A100 80GB 2.04 TB/s);
matched by substring of torch.cuda.get_device_name(), most specific first."""

OPS = ("logprob_entropy", "grpo_loss")
IMPLS = ("triton", "torch_eager", "torch_compile", "liger", "verl")
MODES = ("forward", "backward", "full")
MIN_MEM_MB = 1.0  # memory ratios are only reported when both peaks are at least this large
BYTES_FACTOR = {"forward": 1, "backward": 2, "full": 3}  # x T * V_shard * itemsize (see module doc)


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    tp: int

    @property
    def v_shard(self) -> int:
        return self.vocab // self.tp


def registry(args) -> list[Shape]:
    if args.tiny:
        return [Shape(*s) for s in TINY_SHAPES]
    return [Shape(t, v, tp) for v in (args.vocab or QWEN25_VOCABS) for t in (args.tokens or REAL_TOKENS)
            for tp in (args.tp or REAL_TP)]


# ----------------------------------------------------------------------------------------------
# Implementations: each returns (fn(logits) -> tuple of outputs, upstream grads) or raises Skip
# ----------------------------------------------------------------------------------------------
class Skip(Exception):
    """This implementation cannot run here; the message says why."""


def _grpo_inputs(T: int, device) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    return dict(old_logprobs=-torch.rand(T, generator=g, device=device) * 3,
                advantages=torch.randn(T, generator=g, device=device),
                loss_mask=torch.ones(T, device=device),
                ref_logprobs=-torch.rand(T, generator=g, device=device) * 3)


GRPO_KW = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.01, kl_type="k3")


def _liger(op, targets, extra):
    try:
        if op == "logprob_entropy":
            from liger_kernel.transformers.functional import liger_cross_entropy
        else:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as e:  # noqa: BLE001 - any import failure means "not importable"
        raise Skip(f"not importable ({type(e).__name__}: {e})") from None
    if op == "logprob_entropy":  # Liger has no fused entropy: -cross_entropy = log-prob only
        return lambda x: (-liger_cross_entropy(x, targets, reduction="none"),)

    def grpo(x):  # Liger wants [B, L+1, V] logits and [B, L] ids, one advantage per sequence
        x3 = torch.cat([x, x[-1:]])[None]  # [1, T+1, V] (the concat is inside the timing: stated)
        out = triton_grpo_loss(x3, extra["old_logprobs"][None], extra["ref_logprobs"][None], targets[None],
                               extra["advantages"][:1], extra["loss_mask"][None], temperature=1.0,
                               beta=GRPO_KW["kl_coef"], eps_low=0.2, eps_high=0.28, inplace=False)
        return (out[0] if isinstance(out, tuple) else out,)
    return grpo


def _verl(op, targets, extra):
    if op != "logprob_entropy":
        raise Skip("verl has no logits->GRPO-loss kernel (its path is logprobs_from_logits + core_algos)")
    try:
        from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits
    except Exception as e:  # noqa: BLE001
        raise Skip(f"not importable ({type(e).__name__}: {e})") from None
    return lambda x: (logprobs_from_logits(x, targets), entropy_from_logits(x))


_COMPILED: dict[str, object] = {}


def build(op: str, impl: str, targets: torch.Tensor, extra: dict):
    """fn(logits) -> tuple of differentiable outputs, for one implementation of one op."""
    if impl in ("liger", "verl"):
        return (_liger if impl == "liger" else _verl)(op, targets, extra)
    if op == "logprob_entropy":
        fns = {"triton": fused_logprob_entropy, "torch_eager": logprob_entropy_reference}
        if impl == "torch_compile":
            fns["torch_compile"] = _COMPILED.setdefault(op, torch.compile(logprob_entropy_reference))
        fn = fns[impl]
        return lambda x: tuple(fn(x, targets))
    fns = {"triton": fused_grpo_loss, "torch_eager": grpo_loss_reference}
    if impl == "torch_compile":
        fns["torch_compile"] = _COMPILED.setdefault(op, torch.compile(grpo_loss_reference))
    fn = fns[impl]
    return lambda x: (fn(x, targets, **extra, **GRPO_KW)[0],)


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------
def _no_setup():
    return None


def _time_ms(fn, reps: int, warmup: int, cuda: bool, setup=_no_setup) -> float:
    """Median time of fn(setup()) over reps; setup (e.g. the forward before a backward) is untimed."""
    for _ in range(warmup):
        fn(setup())
    samples = []
    for _ in range(reps):
        state = setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(state)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(state)
            samples.append((time.perf_counter() - t0) * 1e3)
        del state
    return statistics.median(samples)


def _peak_mem_mb(fn, cuda: bool, setup=_no_setup) -> tuple[float, str]:
    """Peak memory of fn(state) above what exists after setup() (inputs, saved activations)."""
    state = setup()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda_max_memory_allocated"
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)  # 1 ms: finer than any CPU run here, coarse enough to stay cheap

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn(state)
    done.set()
    thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return (peak[0] - base) / 2**20, "cpu_rss_delta_sampled_1ms"


def measure_cpu_bandwidth_gbps() -> float:
    """Peak-ish CPU memory bandwidth: best of 5 copies of a 64 MiB buffer (read + write counted)."""
    src = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB: well past the last-level cache
    dst = torch.empty_like(src)
    best = min(_time_ms(lambda _: dst.copy_(src), 1, 1, False) for _ in range(5))
    return 2 * src.numel() * 4 / (best / 1e3) / 1e9


def peak_gbps(args, cuda: bool) -> tuple[float, str]:
    if args.peak_gbps:
        return args.peak_gbps, "--peak-gbps"
    if cuda:
        name = torch.cuda.get_device_name()
        for key, value in PEAK_GBPS.items():
            if key in name:
                return value, f"datasheet ({key})"
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-gbps with its HBM bandwidth in GB/s.")
    return measure_cpu_bandwidth_gbps(), "measured CPU memcpy"


# ----------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------
def base_row(op, impl, mode, shape, dtype) -> dict:
    return dict(op=op, impl=impl, mode=mode, tokens=shape.tokens, vocab=shape.vocab, tp=shape.tp,
                v_shard=shape.v_shard, dtype=str(dtype).removeprefix("torch."), status="ok", reason="",
                time_ms=None, peak_mem_mb=None, mem_method=None,
                bytes_moved=BYTES_FACTOR[mode] * shape.tokens * shape.v_shard * dtype.itemsize,
                gbps=None, roofline_frac=None)


def bench_one(op, impl, mode, shape, dtype, args, device, cuda) -> dict:
    row = base_row(op, impl, mode, shape, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    try:
        logits = (torch.randn(shape.tokens, shape.v_shard, generator=g, device=device) * 4).to(dtype)
        targets = torch.randint(0, shape.v_shard, (shape.tokens,), generator=g, device=device)
        extra = _grpo_inputs(shape.tokens, device) if op == "grpo_loss" else {}
        fn = build(op, impl, targets, extra)
        x = logits.requires_grad_(mode != "forward")

        setup = _no_setup
        if mode == "forward":
            def run(_):
                with torch.no_grad():
                    fn(x)
        else:
            ups = [torch.randn_like(o) for o in fn(x)]
            if mode == "backward":  # a fresh forward per repetition, outside the timed region
                def setup():
                    return fn(x)

                def run(outs):
                    torch.autograd.grad(outs, [x], ups)
            else:
                def run(_):
                    torch.autograd.grad(fn(x), [x], ups)
        row["time_ms"] = _time_ms(run, args.reps, args.warmup, cuda, setup)
        row["peak_mem_mb"], row["mem_method"] = _peak_mem_mb(run, cuda, setup)
        row["gbps"] = row["bytes_moved"] / (row["time_ms"] / 1e3) / 1e9
        row["roofline_frac"] = row["gbps"] / args.peak
    except Skip as e:
        row.update(status="skipped", reason=str(e))
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing: report, keep benchmarking
        if impl != "torch_compile":
            raise
        row.update(status="skipped", reason=f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """speedup / memory ratio of each row against torch_eager on the same op, shape and mode."""
    key = lambda r: (r["op"], r["mode"], r["tokens"], r["vocab"], r["tp"], r["dtype"])  # noqa: E731
    eager = {key(r): r for r in rows if r["impl"] == "torch_eager" and r["status"] == "ok"}
    for r in rows:
        e = eager.get(key(r))
        ok = e is not None and r["status"] == "ok"
        r["speedup_vs_eager"] = e["time_ms"] / r["time_ms"] if ok else None
        # below 1 MiB the CPU RSS sampling (page granularity, allocator reuse) is noise, not a ratio
        r["mem_ratio_vs_eager"] = (e["peak_mem_mb"] / r["peak_mem_mb"]
                                   if ok and min(e["peak_mem_mb"], r["peak_mem_mb"]) >= MIN_MEM_MB else None)


def print_table(rows: list[dict]) -> None:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    header = (f"{'op':<16}{'impl':<14}{'mode':<9}{'T':>7}{'V':>8}{'tp':>3}{'dtype':>9}{'ms':>10}"
              f"{'peakMB':>9}{'GB/s':>9}{'roof':>7}{'xEager':>8}{'memx':>7}  status")
    print(header)
    print("-" * len(header))
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:60]}"
        print(f"{r['op']:<16}{r['impl']:<14}{r['mode']:<9}{r['tokens']:>7}{r['vocab']:>8}{r['tp']:>3}"
              f"{r['dtype']:>9}{fmt(r['time_ms'], '.2f'):>10}{fmt(r['peak_mem_mb'], '.1f'):>9}"
              f"{fmt(r['gbps'], '.2f'):>9}{fmt(r['roofline_frac'], '.3f'):>7}"
              f"{fmt(r['speedup_vs_eager'], '.2f'):>8}{fmt(r['mem_ratio_vs_eager'], '.2f'):>7}  {status}")


def markdown_table(rows: list[dict]) -> str:
    """The measured rows as a markdown table (for docs/benchmarks.md); skipped rows are summarised."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    lines = ["| op | impl | mode | T | V | tp | dtype | ms | peak MB | GB/s | roofline | x eager | mem x eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            continue
        lines.append(f"| {r['op']} | {r['impl']} | {r['mode']} | {r['tokens']} | {r['vocab']} | {r['tp']} | "
                     f"{r['dtype']} | {fmt(r['time_ms'], '.2f')} | {fmt(r['peak_mem_mb'], '.1f')} | "
                     f"{fmt(r['gbps'], '.3f')} | {fmt(r['roofline_frac'], '.4f')} | "
                     f"{fmt(r['speedup_vs_eager'], '.2f')} | {fmt(r['mem_ratio_vs_eager'], '.2f')} |")
    skipped = sorted({(r["op"], r["impl"], r["reason"]) for r in rows if r["status"] != "ok"})
    lines += [""] + [f"- {op} / {impl}: not run — {reason}" for op, impl, reason in skipped]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny CPU-sized shapes for a CI smoke run")
    p.add_argument("--tokens", type=int, nargs="*", help=f"T values (default {REAL_TOKENS})")
    p.add_argument("--vocab", type=int, nargs="*", help=f"V values (default {QWEN25_VOCABS})")
    p.add_argument("--tp", type=int, nargs="*", help=f"TP degrees, shard = V/tp (default {REAL_TP})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--reps", type=int, help="timed repetitions (median; default 20 GPU / 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 5 GPU / 1 CPU)")
    p.add_argument("--peak-gbps", type=float, help="device memory bandwidth for the roofline fraction")
    p.add_argument("--out", type=Path, help="write the rows (and run metadata) as JSON here")
    p.add_argument("--markdown", action="store_true", help="also print the ok rows as a markdown table")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.reps = args.reps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.peak, peak_source = peak_gbps(args, cuda)
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in registry(args):
        if shape.vocab % shape.tp:
            raise SystemExit(f"vocab {shape.vocab} is not divisible by tp {shape.tp}; pick a TP that divides it.")
        for op in args.ops:
            for impl in args.impls:
                for mode in args.modes:
                    if impl == "torch_compile" and args.no_compile:
                        rows.append(dict(base_row(op, impl, mode, shape, dtype), status="skipped",
                                         reason="--no-compile"))
                        continue
                    rows.append(bench_one(op, impl, mode, shape, dtype, args, device, cuda))
    add_ratios(rows)
    meta = dict(device=torch.cuda.get_device_name() if cuda else f"CPU ({psutil.cpu_count()} cores)",
                triton_interpreter=kernels.INTERPRET, torch=torch.__version__, peak_gbps=args.peak,
                peak_gbps_source=peak_source, reps=args.reps, warmup=args.warmup,
                bytes_model="fwd: T*V_shard*itemsize (read logits); bwd: 2x (read logits, write dlogits); "
                            "full: 3x", date=time.strftime("%Y-%m-%d", time.gmtime()))
    print(f"# {meta['device']}  peak {args.peak:.1f} GB/s ({peak_source})  interpreter={kernels.INTERPRET}")
    print_table(rows)
    if args.markdown:
        print(markdown_table(rows))
    result = dict(meta=meta, rows=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {len(rows)} rows to {args.out}")
    return result


if __name__ == "__main__":
    main()
