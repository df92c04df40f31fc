"""Write the generated visual-reasoning set (deterministic by seed); optionally (re)train the tiny tokenizer.

    python tools/make_demo_data.py --out data/generated --num 500 --seed 0
    python tools/make_demo_data.py --out data/generated --num 2000 --tokenizer-out assets/tiny_tokenizer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.visual_reasoning import demo_texts, write_demo_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/generated", help="output directory (images/ + sft/preference/rl .jsonl)")
    p.add_argument("--num", type=int, default=500, help="number of samples (tasks and levels cycle)")
    p.add_argument("--seed", type=int, default=0, help="same seed and num -> byte-identical files")
    p.add_argument("--tokenizer-out", default="", help="also train the tiny BPE tokenizer and save it here")
    p.add_argument("--vocab-size", type=int, default=2000, help="tiny tokenizer vocabulary")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be >= 1")
    files = write_demo_set(args.out, args.num, args.seed)
    result = {"samples": args.num, "seed": args.seed, "files": {k: str(v) for k, v in files.items()}}
    if args.tokenizer_out:
        from engine.data.tiny_tokenizer import train_tiny_tokenizer

        result["tokenizer"] = str(train_tiny_tokenizer(demo_texts(args.num, args.seed), args.tokenizer_out, args.vocab_size))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
