"""R1V iterative SFT: models M_1..M_T, M_t trained on D_rm(tau_t) ∪ E_{t-1}.

D_rm(tau) = SFT samples whose reward-model score (data field `algorithm.iterative_sft.score_field`) is
>= tau; E_{t-1} = samples that M_{t-1} answers wrong (greedy generation with the native rollout engine,
final answer extracted and checked by the rule reward against the gold answer in the sample's last
`\\boxed{}`). M_0 is `train.init_from` (E_0 is empty when there is none). Iteration t trains from M_{t-1}
with lr `algorithm.iterative_sft.lrs[t-1]` for `epochs_per_iteration` passes over its selection, in
<run_dir>/iter_<t>; a line per iteration goes to <run_dir>/iterations.jsonl. A finished iteration (its
checkpoint exists) is not trained again, so `--resume auto` continues with the next one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch.distributed as dist

from engine.rl.iterative_sft import select_iteration, tau_for_iteration, wrong_sample_ids


def read_scored_samples(path: Path, score_field: str) -> list[dict]:
    """The SFT JSONL with image paths made absolute (subsets are written elsewhere) and scores checked."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj.get(score_field), (int, float)):
            raise ValueError(f"{path}:{n}: sample {obj.get('id')!r} has no numeric '{score_field}' (the reward-model "
                             f"score iterative SFT selects on); add it or set algorithm.iterative_sft.score_field")
        for key in ("image", "images"):
            if isinstance(obj.get(key), str):
                obj[key] = str((path.parent / obj[key]).resolve())
            elif isinstance(obj.get(key), list):
                obj[key] = [str((path.parent / p).resolve()) for p in obj[key]]
        rows.append(obj)
    return rows


def _as_rl_probe(sample: dict) -> dict | None:
    """SFT sample -> RL prompt record (first human turn, gold = the answer's final \\boxed{}), or None."""
    from engine.rl.answer_extraction import extract_final_answer

    turns = sample.get("conversations", [])
    human = next((t["value"] for t in turns if t.get("from") in ("human", "user")), None)
    answer = next((t["value"] for t in reversed(turns) if t.get("from") in ("gpt", "assistant")), None)
    gold = extract_final_answer(answer) if answer else None
    if human is None or gold is None:
        return None
    probe = {"id": sample["id"], "prompt": human, "answer": gold}
    for key in ("image", "images"):
        if key in sample:
            probe[key] = sample[key]
    return probe


def answered_wrong(trainer, samples: list[dict], work_dir: Path) -> set[str]:
    """Ids of the samples the trainer's current model answers wrong (greedy), over all DP ranks."""
    from engine.data.loader import build_rl_prompt_iterator
    from engine.rl.rewards import RewardSample, build_reward
    from engine.rollout.base import SamplingParams, requests_from_prompts, stop_token_ids
    from engine.rollout.native import NativeRolloutEngine

    cfg = trainer.cfg
    probes = [p for p in map(_as_rl_probe, samples) if p is not None]
    probe_file = work_dir / "probe.jsonl"
    if trainer.rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        probe_file.write_text("".join(json.dumps(p) + "\n" for p in probes))
    dist.barrier()
    pcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="rl", packing=False, shuffle=False,
                                                             train_path=str(probe_file)))
    it = build_rl_prompt_iterator(pcfg, 1, trainer.dp_rank, trainer.dp_size)
    tok = it.ctx.tokenizer.hf
    engine = NativeRolloutEngine(trainer.model, trainer.pg.tp, cfg.model.llm.vocab_size,
                                 cfg.rollout.max_model_len, tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_tokens=cfg.algorithm.iterative_sft.probe_max_tokens,
                            stop_token_ids=stop_token_ids(tok))
    rule = build_reward("rule")
    ids, correct = [], []
    trainer.model.eval()
    for _ in range(it.plans.sampler.shard_size):
        b = next(it)
        out = engine.generate(requests_from_prompts(b), params)[0]
        text = tok.decode(out.completions[0].token_ids, skip_special_tokens=True)
        ids.append(b["sample_ids"][0][0])
        correct.append(float(rule([RewardSample("", text, b["answers"][0])]).total[0]) > 0)
    trainer.model.train()
    gathered = [None] * dist.get_world_size(trainer.pg.dp)
    dist.all_gather_object(gathered, sorted(wrong_sample_ids(ids, correct)), group=trainer.pg.dp)
    return {sid for part in gathered for sid in part}


def run(cfg, resume: str | None = None) -> int:
    from engine.parallel.init import initialize, shutdown
    from engine.train import checkpointing as ckpt
    from engine.train.trainer import Trainer

    initialize(cfg.parallel, seed=cfg.train.seed)  # the selection files are written by rank 0
    it_cfg = cfg.algorithm.iterative_sft
    run_dir = Path(cfg.train.run_dir)
    samples = read_scored_samples(Path(cfg.data.train_path), it_cfg.score_field)
    scores = {s["id"]: float(s[it_cfg.score_field]) for s in samples}
    by_id = {s["id"]: s for s in samples}
    previous = cfg.train.init_from
    wrong: set[str] = set()
    wrong_known = False  # E_0 is found with M_0 once the first trainer has built a model
    for t in range(1, len(it_cfg.tau_schedule) + 1):
        it_dir = run_dir / f"iter_{t}"
        done = (it_dir / "checkpoints" / "latest").exists() and resume is not None
        tau = tau_for_iteration(it_cfg.tau_schedule, t)
        if done:
            previous, wrong_known = str(it_dir), False
            continue
        # Build M_{t-1} (as the trainer of iteration t, initialised from it), find E_{t-1}, then select.
        base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(it_dir), init_from=previous or "",
                                                                  stage="sft"))
        if previous and not wrong_known:  # E_{t-1} of a model this run did not train (M_0, or after a resume)
            probe_trainer = Trainer(base)
            wrong = answered_wrong(probe_trainer, samples, it_dir)
            del probe_trainer
        selection = select_iteration(scores, wrong, tau)
        subset = it_dir / "train.jsonl"
        if dist.get_rank() == 0:
            it_dir.mkdir(parents=True, exist_ok=True)
            subset.write_text("".join(json.dumps(by_id[sid]) + "\n" for sid in selection.ids))
        dist.barrier()
        steps = max(1, math.ceil(it_cfg.epochs_per_iteration * selection.num_total / cfg.train.global_batch_size))
        icfg = dataclasses.replace(
            base, data=dataclasses.replace(cfg.data, train_path=str(subset)),
            optim=dataclasses.replace(cfg.optim, lr=it_cfg.lrs[t - 1]),
            train=dataclasses.replace(base.train, max_steps=steps),
        )
        trainer = Trainer(icfg)
        trainer.fit()
        wrong = answered_wrong(trainer, samples, it_dir)  # E_t, for iteration t+1
        wrong_known = True
        if trainer.rank == 0:
            (it_dir / "wrong_after.json").write_text(json.dumps(sorted(wrong)))
            with (run_dir / "iterations.jsonl").open("a") as f:
                f.write(json.dumps({"iteration": t, "tau": tau, "lr": it_cfg.lrs[t - 1], "steps": steps,
                                    "d_rm": selection.num_rm, "e_prev": selection.num_wrong,
                                    "overlap": selection.num_overlap, "selected": selection.num_total,
                                    "pool": selection.num_pool, "wrong_after": len(wrong)}) + "\n")
        previous = str(ckpt.resolve_checkpoint(it_dir))
        del trainer
    shutdown()
    return 0
