"""Microbenchmark the fused kernels against torch eager, torch.compile, Liger-Kernel and verl.

    .venv/bin/python tools/bench_kernels.py --tiny --out bench.json            # CPU smoke (seconds)
    python tools/bench_kernels.py --tokens 16384 --vocab 152064 --tp 1 --out h100.json   # on a GPU

Ops. Logits input: `logprob_entropy`, `grpo_loss` (the kernels read [T, V_shard] logits).
Output layer included: `linear_logprob_entropy`, `linear_grpo_loss` (inputs hidden [T, H] and the
output weight shard [V_shard, H]; the op is the output layer's matmul + the loss, forward and backward
to hidden and weight), which is where fused_linear (kernels/fused_linear_*.py, [T, V] never exists) is
compared with the logits-materialising paths: triton (matmul + the logits kernel, a separate dlogits
buffer), triton_inplace (the same with dlogits written into the logits), torch_eager / torch_compile
(matmul + the torch oracle), liger (its fused-linear cross entropy / GRPO) and verl (its
linear_cross_entropy), the last two when importable.

For each (op, shape, implementation, mode in forward / backward / full) it reports time, peak memory,
achieved GB/s under a bytes-moved model and the fraction of the device's memory-bandwidth roofline.

Bytes-moved model (the minimum the logits kernels must move; [T]-sized vectors are < 0.01% at 152k
vocab and are left out): forward reads the logits once (T * V_shard * itemsize); backward reads the
logits and writes dlogits (2x); full = 3x. GB/s = bytes / time; roofline fraction = GB/s / peak GB/s.
The linear ops report the same bytes (the unfused loss kernel's traffic) and, in addition, the
matmul FLOPs of the unfused path (`flops`: forward 2*T*V*H, backward 4*T*V*H, full 6*T*V*H) and
TFLOP/s = flops / time; fused_linear does one more matmul in the backward (it recomputes the logits).

Vocab-parallel shapes (tp > 1) time one rank's [T, V/tp] shard without the all-reduce (the kernels'
per-rank work; the [T]-sized collectives are not part of this benchmark).

Time: CUDA events (median of --reps after --warmup) on GPU; time.perf_counter on CPU, where the
Triton kernels run in the interpreter, so CPU times say nothing about GPU speed (smoke only).
Peak memory, above what exists before the measured call (inputs, and for the backward mode the
saved forward): torch.cuda.max_memory_allocated on GPU. On CPU (--cpu-mem, default `profiler`): the
torch profiler's allocator events (`profile_memory=True`: every allocation and free of torch's CPU
allocator, summed in time order; exact bytes; tracemalloc cannot see torch's allocator), or `rss`:
the process RSS above its start, sampled every 1 ms by a psutil thread (approximate: freed-and-reused
heap pages are not seen again). The JSON names the method used in each row ("mem_method").
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
    fused_linear_grpo_loss,
    fused_linear_logprob_entropy,
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
REAL_HIDDEN = 5120  # Qwen2.5-32B, the LLM of Skywork-R1V 38B
TINY_SHAPES = ((64, 1000, 1, 64), (64, 1000, 2, 64), (48, 1537, 1, 96))  # (T, V, tp, H): odd V, seconds on CPU

PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}
"""HBM bandwidth from the vendors' datasheets (H100 SXM 3.35 TB/s, H200 4.8 TB/s, A100 80GB 2.04 TB/s);
matched by substring of torch.cuda.get_device_name(), most specific first."""

LOGITS_OPS = ("logprob_entropy", "grpo_loss")
LINEAR_OPS = ("linear_logprob_entropy", "linear_grpo_loss")
OPS = LOGITS_OPS + LINEAR_OPS
IMPLS = ("triton", "triton_inplace", "fused_linear", "torch_eager", "torch_compile", "liger", "verl")
OP_IMPLS = {
    **{op: ("triton", "torch_eager", "torch_compile", "liger", "verl") for op in LOGITS_OPS},
    **{op: IMPLS for op in LINEAR_OPS},
}
"""Which implementations each op has: fused_linear and triton_inplace need the output layer inside the
op (in-place dlogits need logits made by an op, not a leaf input)."""
MODES = ("forward", "backward", "full")
MIN_MEM_MB = 1.0  # memory ratios are only reported when both peaks are at least this large
BYTES_FACTOR = {"forward": 1, "backward": 2, "full": 3}  # x T * V_shard * itemsize (see module doc)
FLOPS_FACTOR = {"forward": 2, "backward": 4, "full": 6}  # x T * V_shard * H, unfused matmuls (module doc)


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    tp: int
    hidden: int

    @property
    def v_shard(self) -> int:
        return self.vocab // self.tp


def registry(args) -> list[Shape]:
    if args.tiny:
        return [Shape(*s) for s in TINY_SHAPES]
    return [Shape(t, v, tp, h) for v in (args.vocab or QWEN25_VOCABS) for t in (args.tokens or REAL_TOKENS)
            for tp in (args.tp or REAL_TP) for h in (args.hidden or (REAL_HIDDEN,))]


# ----------------------------------------------------------------------------------------------
# Implementations: each returns (fn(logits) -> tuple of outputs, upstream grads) or raises Skip
# ----------------------------------------------------------------------------------------------
class Skip(Exception):
    """This implementation cannot run here; the message says why."""


def _grpo_inputs(T: int, device, n_skipped: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    loss_mask = torch.ones(T, device=device)
    loss_mask[:n_skipped] = 0.0  # the prompt / padding block (see --ignore-frac)
    return dict(old_logprobs=-torch.rand(T, generator=g, device=device) * 3,
                advantages=torch.randn(T, generator=g, device=device),
                loss_mask=loss_mask,
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


def _liger_linear(op, targets, extra):
    try:
        if op == "linear_logprob_entropy":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as e:  # noqa: BLE001 - any import failure means "not importable"
        raise Skip(f"not importable ({type(e).__name__}: {e})") from None
    if op == "linear_logprob_entropy":  # log-prob only (Liger's fused linear CE has no entropy output)
        return lambda h, w: (-liger_fused_linear_cross_entropy(h, w, targets, reduction="none"),)
    grpo = LigerFusedLinearGRPOLoss(beta=GRPO_KW["kl_coef"], use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                    loss_type="bnpo")

    def fn(h, w):  # one sequence [1, T]; Liger reduces to a scalar loss itself
        out = grpo(h[None], w, targets[None], extra["loss_mask"][None], extra["advantages"][:1],
                   ref_per_token_logps=extra["ref_logprobs"][None], old_per_token_logps=extra["old_logprobs"][None])
        return (out[0] if isinstance(out, tuple) else out,)
    return fn


def _verl_linear(op, targets, extra):
    if op != "linear_logprob_entropy":
        raise Skip("verl has no fused linear GRPO loss (its path is linear_cross_entropy + core_algos)")
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        raise Skip(f"not importable ({type(e).__name__}: {e})") from None
    return lambda h, w: tuple(linear_cross_entropy(h, w, targets, 1.0, "none"))


_COMPILED: dict[str, object] = {}


def _linear_reference(op):
    """The materialised path in plain torch: output-layer matmul, then the oracle."""
    if op == "linear_logprob_entropy":
        return lambda h, w, targets, extra: tuple(logprob_entropy_reference(h @ w.t(), targets))
    return lambda h, w, targets, extra: (grpo_loss_reference(h @ w.t(), targets, **extra, **GRPO_KW)[0],)


def build(op: str, impl: str, targets: torch.Tensor, extra: dict):
    """fn(*inputs) -> tuple of differentiable outputs, for one implementation of one op.

    Inputs: (logits,) for the logits ops, (hidden, weight) for the linear ops."""
    if op in LINEAR_OPS:
        return build_linear(op, impl, targets, extra)
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


def build_linear(op: str, impl: str, targets: torch.Tensor, extra: dict):
    """fn(hidden, weight) -> outputs: the output layer's matmul and the loss, in one implementation."""
    if impl in ("liger", "verl"):
        return (_liger_linear if impl == "liger" else _verl_linear)(op, targets, extra)
    grpo = op == "linear_grpo_loss"
    if impl == "fused_linear":
        if grpo:
            return lambda h, w: (fused_linear_grpo_loss(h, w, targets, **extra, **GRPO_KW)[0],)
        return lambda h, w: tuple(fused_linear_logprob_entropy(h, w, targets))
    if impl in ("triton", "triton_inplace"):
        inplace = impl == "triton_inplace"
        if grpo:
            return lambda h, w: (fused_grpo_loss(h @ w.t(), targets, **extra, **GRPO_KW, inplace_backward=inplace)[0],)
        return lambda h, w: tuple(fused_logprob_entropy(h @ w.t(), targets, inplace_backward=inplace))
    ref = _linear_reference(op)
    if impl == "torch_compile":
        ref = _COMPILED.setdefault(op, torch.compile(ref))
    return lambda h, w: ref(h, w, targets, extra)


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


def _peak_mem_mb(fn, cuda: bool, setup=_no_setup, cpu_method: str = "profiler") -> tuple[float, str]:
    """Peak memory of fn(state) above what exists after setup() (inputs, saved activations)."""
    state = setup()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda_max_memory_allocated"
    if cpu_method == "profiler":
        return _profiler_peak_mb(fn, state), "torch_profiler_cpu_alloc_events"
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


def _profiler_peak_mb(fn, state) -> float:
    """Peak of the bytes torch's CPU allocator holds for blocks allocated while fn(state) runs, in MiB.

    The profiler records every allocation and free with its address (`experimental_event_tree`, the
    source of torch's own memory timeline). Frees are counted only for blocks allocated inside fn: a
    block from before (inputs, or one the Triton interpreter kept alive from an earlier launch and drops
    at its next launch) is not credited, so each row measures exactly what its own call allocates."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(state)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted((n.start_time_ns, n.extra_fields.ptr, n.extra_fields.alloc_size)
                    for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                    if n.tag == _EventType.Allocation)
    live: dict[int, int] = {}
    running = peak = 0
    for _, ptr, size in events:
        if size > 0:
            live[ptr] = size
            running += size
            peak = max(peak, running)
        elif ptr in live:  # a free of a block allocated inside fn
            running -= live.pop(ptr)
    return peak / 2**20


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
    linear = op in LINEAR_OPS
    return dict(op=op, impl=impl, mode=mode, tokens=shape.tokens, vocab=shape.vocab, tp=shape.tp,
                v_shard=shape.v_shard, hidden=shape.hidden if linear else None,
                dtype=str(dtype).removeprefix("torch."), status="ok", reason="",
                time_ms=None, peak_mem_mb=None, mem_method=None,
                bytes_moved=BYTES_FACTOR[mode] * shape.tokens * shape.v_shard * dtype.itemsize,
                gbps=None, roofline_frac=None,
                flops=FLOPS_FACTOR[mode] * shape.tokens * shape.v_shard * shape.hidden if linear else None,
                tflops=None, ignore_frac=0.0)


def _inputs(op, shape, dtype, device, g) -> list[torch.Tensor]:
    """The op's differentiable inputs: [logits] or [hidden, weight] (logits ~ N(0, 16) either way)."""
    if op in LINEAR_OPS:
        hidden = torch.randn(shape.tokens, shape.hidden, generator=g, device=device).to(dtype)
        weight = (torch.randn(shape.v_shard, shape.hidden, generator=g, device=device)
                  * (4.0 / shape.hidden**0.5)).to(dtype)
        return [hidden, weight]
    return [(torch.randn(shape.tokens, shape.v_shard, generator=g, device=device) * 4).to(dtype)]


def bench_one(op, impl, mode, shape, dtype, args, device, cuda) -> dict:
    row = dict(base_row(op, impl, mode, shape, dtype), ignore_frac=args.ignore_frac)
    g = torch.Generator(device=device).manual_seed(0)
    try:
        leaves = _inputs(op, shape, dtype, device, g)
        targets = torch.randint(0, shape.v_shard, (shape.tokens,), generator=g, device=device)
        n_skipped = int(args.ignore_frac * shape.tokens)
        targets[:n_skipped] = -100  # rows without a label: the kernels skip them (issue 12)
        extra = _grpo_inputs(shape.tokens, device, n_skipped) if op in ("grpo_loss", "linear_grpo_loss") else {}
        fn = build(op, impl, targets, extra)
        xs = [x.requires_grad_(mode != "forward") for x in leaves]

        setup = _no_setup
        if mode == "forward":
            def run(_):
                with torch.no_grad():
                    fn(*xs)
        else:
            ups = [torch.randn_like(o) for o in fn(*xs)]
            if mode == "backward":  # a fresh forward per repetition, outside the timed region
                def setup():
                    return fn(*xs)

                def run(outs):
                    torch.autograd.grad(outs, xs, ups)
            else:
                def run(_):
                    torch.autograd.grad(fn(*xs), xs, ups)
        row["time_ms"] = _time_ms(run, args.reps, args.warmup, cuda, setup)
        row["peak_mem_mb"], row["mem_method"] = _peak_mem_mb(run, cuda, setup, args.cpu_mem)
        row["gbps"] = row["bytes_moved"] / (row["time_ms"] / 1e3) / 1e9
        row["roofline_frac"] = row["gbps"] / args.peak
        if row["flops"] is not None:
            row["tflops"] = row["flops"] / (row["time_ms"] / 1e3) / 1e12
    except Skip as e:
        row.update(status="skipped", reason=str(e))
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing: report, keep benchmarking
        if impl not in ("torch_compile", "liger", "verl"):
            raise
        what = "torch.compile" if impl == "torch_compile" else f"{impl} call"
        row.update(status="skipped", reason=f"{what} failed: {type(e).__name__}: {str(e)[:200]}")
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """speedup / memory ratio of each row against torch_eager on the same op, shape and mode."""
    key = lambda r: (r["op"], r["mode"], r["tokens"], r["vocab"], r["tp"], r["hidden"], r["dtype"])  # noqa: E731
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
    header = (f"{'op':<23}{'impl':<15}{'mode':<9}{'T':>7}{'V':>8}{'tp':>3}{'H':>6}{'dtype':>9}{'ms':>10}"
              f"{'peakMB':>9}{'GB/s':>9}{'roof':>7}{'TFLOP/s':>9}{'xEager':>8}{'memx':>7}  status")
    print(header)
    print("-" * len(header))
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:60]}"
        print(f"{r['op']:<23}{r['impl']:<15}{r['mode']:<9}{r['tokens']:>7}{r['vocab']:>8}{r['tp']:>3}"
              f"{fmt(r['hidden'], 'd'):>6}{r['dtype']:>9}{fmt(r['time_ms'], '.2f'):>10}"
              f"{fmt(r['peak_mem_mb'], '.1f'):>9}{fmt(r['gbps'], '.2f'):>9}{fmt(r['roofline_frac'], '.3f'):>7}"
              f"{fmt(r['tflops'], '.3f'):>9}{fmt(r['speedup_vs_eager'], '.2f'):>8}"
              f"{fmt(r['mem_ratio_vs_eager'], '.2f'):>7}  {status}")


def markdown_table(rows: list[dict]) -> str:
    """The measured rows as a markdown table (for docs/benchmarks.md); skipped rows are summarised."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    lines = ["| op | impl | mode | T | V | tp | H | dtype | ms | peak MB | GB/s | roofline | TFLOP/s | x eager | "
             "mem x eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            continue
        lines.append(f"| {r['op']} | {r['impl']} | {r['mode']} | {r['tokens']} | {r['vocab']} | {r['tp']} | "
                     f"{fmt(r['hidden'], 'd')} | {r['dtype']} | {fmt(r['time_ms'], '.2f')} | "
                     f"{fmt(r['peak_mem_mb'], '.1f')} | {fmt(r['gbps'], '.3f')} | {fmt(r['roofline_frac'], '.4f')} | "
                     f"{fmt(r['tflops'], '.3f')} | {fmt(r['speedup_vs_eager'], '.2f')} | "
                     f"{fmt(r['mem_ratio_vs_eager'], '.2f')} |")
    skipped = sorted({(r["op"], r["impl"], r["reason"]) for r in rows if r["status"] != "ok"})
    lines += [""] + [f"- {op} / {impl}: not run — {reason}" for op, impl, reason in skipped]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny CPU-sized shapes for a CI smoke run")
    p.add_argument("--tokens", type=int, nargs="*", help=f"T values (default {REAL_TOKENS})")
    p.add_argument("--vocab", type=int, nargs="*", help=f"V values (default {QWEN25_VOCABS})")
    p.add_argument("--tp", type=int, nargs="*", help=f"TP degrees, shard = V/tp (default {REAL_TP})")
    p.add_argument("--hidden", type=int, nargs="*", help=f"H values for the linear ops (default {REAL_HIDDEN})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--reps", type=int, help="timed repetitions (median; default 20 GPU / 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 5 GPU / 1 CPU)")
    p.add_argument("--peak-gbps", type=float, help="device memory bandwidth for the roofline fraction")
    p.add_argument("--ignore-frac", type=float, default=0.0,
                   help="fraction of rows (a leading block, like prompts / padding) without a label / loss; "
                        "the bytes and FLOPs models still count every row")
    p.add_argument("--cpu-mem", default="profiler", choices=["profiler", "rss"],
                   help="CPU peak memory: torch profiler allocator events (exact) or sampled RSS")
    p.add_argument("--out", type=Path, help="write the rows (and run metadata) as JSON here")
    p.add_argument("--markdown", action="store_true", help="also print the ok rows as a markdown table")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 0.0 <= args.ignore_frac < 1.0:
        raise SystemExit(f"--ignore-frac must be in [0, 1), got {args.ignore_frac}")
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
            for impl in (i for i in args.impls if i in OP_IMPLS[op]):
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
                            "full: 3x", flops_model="linear ops: unfused matmuls, fwd 2*T*V_shard*H, bwd 4x, full 6x",
                cpu_mem=None if cuda else args.cpu_mem, date=time.strftime("%Y-%m-%d", time.gmtime()))
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
