"""Logit parity of our model against transformers for a HF checkpoint (fp32, CPU or GPU).

    python tools/check_hf_parity.py --hf-dir D [--json]
    torchrun --nproc_per_node=4 tools/check_hf_parity.py --hf-dir D --tp 2 --pp 2 [--mcore-ckpt O]
    python tools/check_hf_parity.py --hf-dir EXPORT --mcore-ckpt O --reference remote-code   # chat export's own code

Builds our model at TP x PP and fills it from D (converted on the fly) or from a converted dist
checkpoint (--mcore-ckpt), runs it and the transformers model on the same deterministic image+text
batch, and prints max |delta logit|, mean KL(hf || ours) and greedy-token agreement. Exit code 1 when
max |delta logit| exceeds --tol (or greedy agreement is below 1), 2 on a conversion error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_TOL = 1e-4  # fp32: what the issue accepts; seen ~2e-6 on tiny models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF checkpoint: internvl, internvl_chat or qwen2 layout")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--mcore-ckpt", default=None, help="load our model from this converted dist checkpoint")
    ap.add_argument("--image-token-id", type=int, default=None)
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL, help="max |delta logit| accepted")
    ap.add_argument("--reference", choices=["transformers", "remote-code"], default="transformers",
                    help="transformers' own classes (default), or an internvl_chat export's modeling code "
                         "(AutoModel with trust_remote_code)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = ap.parse_args(argv)

    import torch.distributed as dist

    from engine.checkpoint.hf_io import CheckpointError
    from engine.checkpoint.parity import run_parity

    try:
        r = run_parity(args.hf_dir, args.tp, args.pp, args.mcore_ckpt, args.image_token_id,
                       reference=args.reference.replace("-", "_"))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = r["max_abs_logit_diff"] <= args.tol and r["greedy_agreement"] == 1.0
    r.update(tol=args.tol, passed=ok)
    if dist.get_rank() == 0:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{args.hf_dir} [{r['layout']}] TP={args.tp} PP={args.pp} from {r['source']} vs {r['reference']}: "
                  f"max |dlogit| {r['max_abs_logit_diff']:.3e}  mean KL {r['mean_kl']:.3e}  "
                  f"greedy agreement {r['greedy_agreement']:.4f}  -> {'PASS' if ok else 'FAIL'} (tol {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
