"""Rollout throughput, native engine vs colocated vLLM, and weight-push time (JSON out).

    python tools/bench_rollout.py --out runs/bench_rollout.json
"""

from engine.rollout.bench import main

if __name__ == "__main__":
    main()
