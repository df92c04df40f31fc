"""Peak memory of streaming checkpoint conversion, JSON out (the issue's "peak near one layer" claim).

    python tools/bench_checkpoint_memory.py [--hidden 1024 --layers 8 --vocab 32000] [--out bench.json]

Writes a synthetic Qwen2 checkpoint (random fp32 weights, written layer by layer so the generator itself
stays small), then runs the real CLI in child processes and reads their `--report-memory` JSON:
  hf-to-mcore at TP=1 (1 process) and TP=2 (torchrun, 2 processes), mcore-to-hf with 256 MiB shards.
Reported per run: peak RSS, the RSS after imports (baseline), their difference, the checkpoint size and
the largest tensor group (one layer, or the embedding).
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


def write_synthetic_qwen2(out: Path, hidden: int, layers: int, vocab: int, ffn: int, heads: int, kv_heads: int) -> int:
    import torch

    from engine.checkpoint.hf_config import llm_to_hf
    from engine.checkpoint.hf_io import HFWriter
    from engine.config.model import LLMConfig, ModelConfig

    m = ModelConfig(llm=LLMConfig(vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
                                  num_attention_heads=heads, num_query_groups=kv_heads, max_position_embeddings=4096))
    d = hidden // heads
    w = HFWriter(out, max_shard_bytes=256 << 20)  # 256 MiB shards: many files, like a real sharded checkpoint
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    w.add("model.embed_tokens.weight", rnd(vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj.weight", (heads * d, hidden)), ("self_attn.k_proj.weight", (kv_heads * d, hidden)),
                            ("self_attn.v_proj.weight", (kv_heads * d, hidden)), ("self_attn.q_proj.bias", (heads * d,)),
                            ("self_attn.k_proj.bias", (kv_heads * d,)), ("self_attn.v_proj.bias", (kv_heads * d,)),
                            ("self_attn.o_proj.weight", (hidden, hidden)), ("mlp.gate_proj.weight", (ffn, hidden)),
                            ("mlp.up_proj.weight", (ffn, hidden)), ("mlp.down_proj.weight", (hidden, ffn))):
            w.add(p + name, rnd(*shape))
        w.add(p + "input_layernorm.weight", torch.ones(hidden))
        w.add(p + "post_attention_layernorm.weight", torch.ones(hidden))
    w.add("model.norm.weight", torch.ones(hidden))
    w.add("lm_head.weight", rnd(vocab, hidden))
    w.close()
    cfg = llm_to_hf(m)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return w.total_bytes


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def cli(args: list[str], nproc: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": _port()}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={nproc}", f"--master_port={_port()}"]
    proc = subprocess.run([*launcher, str(REPO / "tools/convert_checkpoint.py"), *args, "--report-memory", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
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
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = write_synthetic_qwen2(tmp / "hf", args.hidden, args.layers, args.vocab, args.ffn, args.heads, args.kv_heads)
        runs = {
            "hf_to_mcore_tp1": cli(["hf-to-mcore", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mc1")]),
            "hf_to_mcore_tp2_rank0": cli(["hf-to-mcore", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mc2"),
                                          "--tp", "2"], nproc=2),
            "mcore_to_hf_256MiB_shards": cli(["mcore-to-hf", "--ckpt", str(tmp / "mc2"), "--out", str(tmp / "hf_out"),
                                              "--layout", "qwen2", "--max-shard-gb", "0.25"]),
        }
    rows = {"checkpoint_MiB": round(size / mib, 1), "shape": vars(args) | {"out": None}}
    for name, r in runs.items():
        rows[name] = {k.replace("_bytes", "_MiB"): round(v / mib, 1) for k, v in r.items() if k.endswith("_bytes")}
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
