"""Peak memory of streaming checkpoint conversion, JSON out (the issue's "peak near one layer" claim).

    python tools/bench_checkpoint_memory.py [--hidden 1024 --layers 8 --vocab 32000 --dtype float32] [--out bench.json]
    python tools/bench_checkpoint_memory.py --repo /path/to/other/checkout   # the same runs on another checkout's CLI

Writes a synthetic Qwen2 checkpoint (random weights, written tensor by tensor so the generator itself
stays small; config.json from our config mapping, no download), then runs the real CLI in child
processes and reads their `--report-memory` JSON:
  hf-to-mcore at TP=1 (1 process), hf-to-mcore at TP=2 (torchrun, 2 processes; rank 0 reported),
  mcore-to-hf with 256 MiB shards.
Reported: the checkpoint size, one decoder layer, the largest tensor group (a layer, or the embedding
alone) and per run: RSS of the bare interpreter (start), after the imports (baseline: python, torch,
megatron, engine), the peak after the imports, and peak - baseline (what the conversion itself holds).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_synthetic_qwen2(out: Path, hidden: int, layers: int, vocab: int, ffn: int, heads: int, kv_heads: int,
                          dtype: str = "float32", tied: bool = False) -> dict:
    """A random Qwen2 checkpoint in 256 MiB safetensors shards. Returns its sizes in bytes."""
    import torch

    from engine.checkpoint.hf_config import llm_to_hf
    from engine.checkpoint.hf_io import HFWriter
    from engine.config.model import LLMConfig, ModelConfig

    m = ModelConfig(llm=LLMConfig(vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
                                  num_attention_heads=heads, num_query_groups=kv_heads, max_position_embeddings=4096,
                                  tie_embeddings=tied), params_dtype=dtype)
    dt = getattr(torch, dtype)
    d = hidden // heads
    w = HFWriter(out, max_shard_bytes=256 << 20)  # 256 MiB shards: many files, like a real sharded checkpoint
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    w.add("model.embed_tokens.weight", rnd(vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        before = w.total_bytes
        for name, shape in (("self_attn.q_proj.weight", (heads * d, hidden)), ("self_attn.k_proj.weight", (kv_heads * d, hidden)),
                            ("self_attn.v_proj.weight", (kv_heads * d, hidden)), ("self_attn.q_proj.bias", (heads * d,)),
                            ("self_attn.k_proj.bias", (kv_heads * d,)), ("self_attn.v_proj.bias", (kv_heads * d,)),
                            ("self_attn.o_proj.weight", (hidden, hidden)), ("mlp.gate_proj.weight", (ffn, hidden)),
                            ("mlp.up_proj.weight", (ffn, hidden)), ("mlp.down_proj.weight", (hidden, ffn))):
            w.add(p + name, rnd(*shape))
        w.add(p + "input_layernorm.weight", torch.ones(hidden, dtype=dt))
        w.add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=dt))
        layer_bytes = w.total_bytes - before
    w.add("model.norm.weight", torch.ones(hidden, dtype=dt))
    if not tied:
        w.add("lm_head.weight", rnd(vocab, hidden))
    w.close()
    cfg = llm_to_hf(m)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    embedding = vocab * hidden * dt.itemsize
    return {"weights_bytes": w.total_bytes, "layer_bytes": layer_bytes, "embedding_bytes": embedding,
            "largest_group_bytes": max(layer_bytes, embedding)}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def cli(args: list[str], nproc: int = 1, repo: Path = REPO, timeout: int = 1800) -> dict:
    """Run tools/convert_checkpoint.py of `repo` with --report-memory; its JSON line (rank 0's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": _port()}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={nproc}", f"--master_port={_port()}"]
    proc = subprocess.run([*launcher, str(repo / "tools/convert_checkpoint.py"), *args, "--report-memory", "--no-progress"],
                          cwd=repo, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repo", type=Path, default=REPO, help="run this checkout's CLI (e.g. the code before a change)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = write_synthetic_qwen2(tmp / "hf", args.hidden, args.layers, args.vocab, args.ffn, args.heads,
                                      args.kv_heads, args.dtype)
        runs = {
            "hf_to_mcore_tp1": cli(["hf-to-mcore", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mc1")], repo=args.repo),
            "hf_to_mcore_tp2_2proc_rank0": cli(["hf-to-mcore", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mc2"),
                                                "--tp", "2"], nproc=2, repo=args.repo),
            "mcore_to_hf_256MiB_shards": cli(["mcore-to-hf", "--ckpt", str(tmp / "mc2"), "--out", str(tmp / "hf_out"),
                                              "--layout", "qwen2", "--max-shard-gb", "0.25"], repo=args.repo),
        }
    rows = {"repo": str(args.repo), "shape": {k: v for k, v in vars(args).items() if k not in ("out", "repo")},
            **{k.replace("_bytes", "_MiB"): round(v / mib, 1) for k, v in sizes.items()}}
    for name, r in runs.items():
        row = {k.replace("_bytes", "_MiB"): round(v / mib, 1) for k, v in r.items() if k.endswith("_bytes")}
        if "start_rss_MiB" in row:
            row["imports_MiB"] = round(row["baseline_rss_MiB"] - row["start_rss_MiB"], 1)
        row["peak_above_baseline_per_layer"] = round(r["peak_above_baseline_bytes"] / sizes["layer_bytes"], 2)
        row["peak_above_baseline_per_model"] = round(r["peak_above_baseline_bytes"] / sizes["weights_bytes"], 3)
        rows[name] = row
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
