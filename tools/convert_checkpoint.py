"""HF <-> megatron dist checkpoint conversion for the VLM (see docs/checkpoints.md).

    # HF (transformers-native InternVL, InternVL-chat / Skywork-R1V, Qwen2) -> dist checkpoint for TP x PP;
    # one process is enough (it streams piece by piece), torchrun with any number shares the work
    python tools/convert_checkpoint.py hf-to-mcore --hf-dir D --out O --tp N --pp M
    torchrun --nproc_per_node=8 tools/convert_checkpoint.py hf-to-mcore --hf-dir D --out O --tp N --pp M
    # dist checkpoint (any TP/PP) -> HF, one process
    python tools/convert_checkpoint.py mcore-to-hf --ckpt O --out D --layout {internvl,internvl_chat,qwen2}
    # vision from A, connector from B (or `init`), LLM from C -> dist checkpoint
    python tools/convert_checkpoint.py assemble --vision A --connector B --llm C --out O
    # does a recipe's model.* describe this HF checkpoint? (lists the differing fields, exit 1)
    python tools/convert_checkpoint.py check-recipe --hf-dir D --config recipes/r1v_grpo.yaml [key=value ...]

Outputs are written to `<out>.partial` and renamed when complete; a non-empty output is replaced only
with --force. `--report-memory` prints, as JSON, the resident memory after the imports (baseline) and
the conversion's peak (VmHWM, reset after the imports where Linux allows), so the difference is the
conversion's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def current_rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (VmHWM, getrusage's ru_maxrss) at the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def unmap_freed_tensors() -> None:
    """glibc: a fixed mmap threshold, so every allocation over 1 MiB is its own mapping, unmapped when freed.

    By default glibc raises the threshold (up to 32 MiB) each time such a block is freed; later tensors of
    that size then come from the heap, which keeps what was freed around whatever is still live. Converting
    piece by piece, that was 20-40 MiB of dead pieces in the peak (hf-to-mcore of a 594 MiB fp32 model:
    112 -> 75 MiB above the baseline). Any fixed value turns the adjustment off; no-op off glibc.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (written as <out>.partial, renamed at the end)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-memory", action="store_true", help="print peak RSS and sizes as JSON on stdout")


def _mcore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallel size the checkpoint is written for (vocab / ViT-head padding; it loads at any "
                        "TP/PP); any number of processes may run the conversion")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size recorded with the checkpoint")
    p.add_argument("--image-token-id", type=int, default=None, help="id of <IMG_CONTEXT> when config/tokenizer lack it")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hf-to-mcore", help="HF checkpoint -> megatron dist checkpoint")
    p.add_argument("--hf-dir", required=True)
    _mcore_args(p)
    _common(p)
    p = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--layout", required=True, choices=["internvl", "internvl_chat", "qwen2", "internvit"])
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (GiB)")
    _common(p)
    p = sub.add_parser("assemble", help="vision + connector + LLM from different HF checkpoints -> dist checkpoint")
    p.add_argument("--vision", required=True, help="InternVL (either layout) or InternViT-only checkpoint")
    p.add_argument("--connector", required=True, help="InternVL checkpoint whose connector to take, or 'init' for a fresh one")
    p.add_argument("--llm", required=True, help="Qwen2 or InternVL checkpoint whose LLM to take")
    _mcore_args(p)
    _common(p)
    p = sub.add_parser("check-recipe", help="compare a recipe's model fields with a HF checkpoint's config.json")
    p.add_argument("--hf-dir", required=True,
                   help="the HF checkpoint the recipe trains (any layout; an LLM-only one: the llm fields)")
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--image-token-id", type=int, default=None, help="id of <IMG_CONTEXT> when config/tokenizer lack it")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    return ap.parse_args(argv)


def check_recipe(args) -> int:
    from engine.checkpoint import convert
    from engine.config import ConfigError, load_config

    try:
        recipe = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    diffs = convert.recipe_differences(convert.open_source(args.hf_dir, args.image_token_id), recipe.model)
    for line in diffs:
        print(line)
    what = f"{args.config}'s model fields and {args.hf_dir}/config.json"
    print(f"{what}: {len(diffs)} difference(s)" if diffs else f"OK: {what} agree", file=sys.stderr)
    return 1 if diffs else 0


def main(argv=None) -> int:
    args = parse(argv)
    start = current_rss_bytes()  # the interpreter alone
    from engine.checkpoint import convert
    from engine.checkpoint.hf_io import CheckpointError

    show = not getattr(args, "no_progress", True)
    unmap_freed_tensors()
    if getattr(args, "report_memory", False):  # imported up front so the baseline below includes the libraries
        import megatron.core.dist_checkpointing  # noqa: F401
        import torch._dynamo  # noqa: F401  (the meta-device model's init imports it: torch._refs.normal_)
        import torch.distributed.checkpoint  # noqa: F401
        import tqdm  # noqa: F401

        import engine.model.build  # noqa: F401
        import engine.parallel.init  # noqa: F401
    baseline = current_rss_bytes()
    peak_was_reset = getattr(args, "report_memory", False) and reset_peak_rss()
    try:
        if args.cmd == "check-recipe":
            return check_recipe(args)
        if args.cmd == "hf-to-mcore":
            src = convert.open_source(args.hf_dir, args.image_token_id)
            if src.adapter.name == "internvit":
                raise CheckpointError(f"{args.hf_dir} is an InternViT-only checkpoint; combine it with an LLM via `assemble`")
            sources = {part: src for part in src.adapter.parts}
            report = convert.hf_to_mcore(sources, src.model_dict, args.out, tp=args.tp, pp=args.pp,
                                         force=args.force, show_progress=show)
        elif args.cmd == "assemble":
            vision, llm = convert.open_source(args.vision), convert.open_source(args.llm)
            fresh = args.connector == "init"
            connector = None if fresh else convert.open_source(args.connector)
            for role, s, needed in (("--vision", vision, "vision"), ("--llm", llm, "llm"),
                                    ("--connector", connector, "projector")):
                if s is not None and needed not in s.adapter.parts:
                    raise CheckpointError(f"{role} {s.dir} is a {s.adapter.name} checkpoint and has no {needed} part")
            notes = convert.tokenizer_report(vision, connector, llm)
            for note in notes:
                print(f"WARNING: {note}", file=sys.stderr)
            md = convert.assemble_model_dict(vision, connector, llm, args.image_token_id, fresh_connector=fresh)
            report = convert.hf_to_mcore({"vision": vision, "projector": connector, "llm": llm}, md, args.out,
                                         tp=args.tp, pp=args.pp, force=args.force, show_progress=show)
            report["tokenizer_notes"] = notes
        else:
            report = convert.mcore_to_hf(args.ckpt, args.out, args.layout, force=args.force,
                                         max_shard_bytes=int(args.max_shard_gb * (1 << 30)), show_progress=show)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report_memory and convert.rank() == 0:
        report["start_rss_bytes"] = start  # python alone
        report["baseline_rss_bytes"] = baseline  # after python/torch/megatron/engine imports, before any work
        report["peak_above_baseline_bytes"] = report["peak_rss_bytes"] - baseline
        report["peak_reset_after_imports"] = peak_was_reset
        print(json.dumps({"command": args.cmd, **report}))
    return 0


if __name__ == "__main__":
    code = main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
