"""Native engine: KV-cached batched generation equals the no-cache full forward, and every sampling
parameter does what it says. TP=1 in-process; TP=2 under torchrun (gloo, 2 processes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.rollout.base import GenerationRequest, SamplingParams
from engine.rollout.native import NativeRolloutEngine, full_forward_greedy
from tests.engine.rollout.tiny import VLM, build, image_prompt, single_process_dist_env
from tests.helpers.torchrun import torchrun

WORKER = Path(__file__).with_name("rollout_worker.py")
MAX_LEN = 96  # prompt + response budget of these tests (the model's RoPE covers 256)


def prompts_and_tiles():
    """Different lengths (left padding up to 9 columns), a prompt of one token, and an image row."""
    g = torch.Generator().manual_seed(3)
    tiles = torch.randn(2, 3, 56, 56, generator=g)  # two tiles -> 8 placeholders
    reqs = [
        GenerationRequest([11, 40, 41, 42, 43, 44, 45, 46, 47, 48], request_id="long"),
        GenerationRequest([12], request_id="one-token"),
        GenerationRequest(image_prompt([20, 21], [22, 23], tiles=2), images=tiles, request_id="image"),
        GenerationRequest([30, 31, 32], request_id="short"),
    ]
    return reqs


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    single_process_dist_env(mp)
    cfg, pg, model = build(VLM)
    path = tmp_path_factory.mktemp("native") / "full_state.pt"
    from engine.parallel.full_state import full_state

    torch.save(full_state(model, pg.tp, cfg.model.llm.vocab_size), path)
    eng = NativeRolloutEngine(model, pg.tp, cfg.model.llm.vocab_size, MAX_LEN, max_batch_size=8)
    eng.full_state_path = path
    yield eng
    mp.undo()


def greedy_refs(eng, reqs, max_tokens):
    return [full_forward_greedy(eng.model, eng.tp_group, eng.vocab_size, r.prompt_token_ids, max_tokens,
                                r.images if isinstance(r.images, torch.Tensor) else None) for r in reqs]


def test_greedy_batched_equals_full_forward(engine):
    reqs = prompts_and_tiles()
    results = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=10))
    for req, res, (ref_ids, ref_lps) in zip(reqs, results, greedy_refs(engine, reqs, 10)):
        (c,) = res.completions
        assert c.token_ids == ref_ids, f"{req.request_id}: cached {c.token_ids} != full forward {ref_ids}"
        assert c.finish_reason == "length" and res.request_id == req.request_id
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref_lps), rtol=0, atol=2e-5)


def test_batch_composition_does_not_change_outputs(engine):
    reqs = prompts_and_tiles()
    together = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=6))
    alone = [engine.generate([r], SamplingParams(temperature=0, max_tokens=6))[0] for r in reqs]
    assert [r.completions[0].token_ids for r in together] == [r.completions[0].token_ids for r in alone]


def test_top_k_one_equals_greedy(engine):
    reqs = prompts_and_tiles()
    greedy = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=8))
    topk1 = engine.generate(reqs, SamplingParams(temperature=1.3, top_k=1, max_tokens=8, seed=5))
    assert [r.completions[0].token_ids for r in topk1] == [r.completions[0].token_ids for r in greedy]


def test_logit_bias_ban_is_respected(engine):
    reqs = prompts_and_tiles()
    greedy = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=8))
    banned = {t for r in greedy for t in r.completions[0].token_ids}
    bias = {t: -math.inf for t in banned}
    for params in (SamplingParams(temperature=0, max_tokens=8, logit_bias=bias),
                   SamplingParams(temperature=1.0, max_tokens=8, logit_bias=bias, n=3, seed=1)):
        for r in engine.generate(reqs, params):
            for c in r.completions:
                assert not banned & set(c.token_ids), f"{r.request_id}: banned ids {banned & set(c.token_ids)} sampled"


def test_stop_tokens_and_max_tokens(engine):
    reqs = prompts_and_tiles()
    greedy = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=10))
    ids = greedy[0].completions[0].token_ids
    stop = ids[3]
    first = ids.index(stop)
    res = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]))
    c = res[0].completions[0]
    assert c.token_ids == ids[: first + 1] and c.finish_reason == "stop"  # the stop token is kept
    for r, g in zip(res[1:], greedy[1:]):  # other rows stop only if they hit it too
        gi = g.completions[0].token_ids
        expected = gi[: gi.index(stop) + 1] if stop in gi else gi
        assert r.completions[0].token_ids == expected
    short = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=3))
    assert all(len(r.completions[0].token_ids) == 3 and r.completions[0].finish_reason == "length" for r in short)


def test_max_model_len_caps_the_response(engine):
    req = GenerationRequest(list(range(10, 10 + MAX_LEN - 2)))
    (res,) = engine.generate([req], SamplingParams(temperature=0, max_tokens=50))
    assert len(res.completions[0].token_ids) == 2 and res.completions[0].finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([GenerationRequest(list(range(MAX_LEN)))], SamplingParams(max_tokens=2))


def test_repetition_penalty_follows_the_ctrl_rule(engine):
    """Greedy with a penalty equals a step-by-step full forward whose logits go through transformers'
    RepetitionPenaltyLogitsProcessor (prompt + generated ids), and differs from plain greedy."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    reqs = [r for r in prompts_and_tiles() if r.images is None]
    penalty, steps = 1.8, 10
    res = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=steps, repetition_penalty=penalty))
    plain = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=steps))
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    model = engine.model
    model.eval()
    with torch.no_grad():
        for req, r in zip(reqs, res):
            ids = list(req.prompt_token_ids)
            for _ in range(steps):
                local = model(torch.tensor([ids]), torch.arange(len(ids))[None])
                logits = local[0, -1:, : engine.vocab_size].float()
                ids.append(int(hf(torch.tensor([ids]), logits).argmax(-1)))
            assert r.completions[0].token_ids == ids[len(req.prompt_token_ids):]
    assert any(a.completions[0].token_ids != b.completions[0].token_ids for a, b in zip(res, plain))


def test_seeded_sampling_n_samples(engine):
    reqs = prompts_and_tiles()[:2]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, n=4, seed=7)
    a, b = engine.generate(reqs, params), engine.generate(reqs, params)
    assert all(len(r.completions) == 4 for r in a)
    assert [[c.token_ids for c in r.completions] for r in a] == [[c.token_ids for c in r.completions] for r in b]
    samples = {tuple(c.token_ids) for c in a[0].completions}
    assert len(samples) > 1, "4 samples at temperature 1 over a 300-token vocabulary were all identical"
    for r in a:  # logprobs are the raw model's: finite and <= 0
        assert all(-50 < lp <= 0 for c in r.completions for lp in c.logprobs)


def test_tp2_greedy_equals_full_forward(engine, tmp_path):
    """torchrun, 2 processes, TP=2 (vocab 300 padded to 512, 256 columns per rank): the cached batched
    greedy output equals the full forward at TP=2 and the TP=1 output of the same weights; sampling at
    temperature 5 never picks a padding column and both TP ranks feed the same tokens."""
    reqs = prompts_and_tiles()
    tp1 = [r.completions[0].token_ids for r in engine.generate(reqs, SamplingParams(temperature=0, max_tokens=10))]
    torchrun(WORKER, ["--mode", "native", "--init", str(engine.full_state_path), "--out", str(tmp_path)], nproc=2)
    out = json.loads((tmp_path / "native_rank0.json").read_text())
    assert out["cached"] == out["full_forward"], out
    assert out["cached"] == tp1, f"TP=2 {out['cached']} != TP=1 {tp1}"
    other = json.loads((tmp_path / "native_rank1.json").read_text())
    assert other["cached"] == out["cached"] and other["hot_samples"] == out["hot_samples"]  # ranks agree
    sampled = [t for ids in out["hot_samples"] for t in ids]
    assert len(sampled) == 4 * 4 * 10 and max(sampled) < 300, "a TP padding column was sampled"


def _unused_id(results, start: int = 200) -> int:
    seen = {t for r in results for c in r.completions for t in c.token_ids}
    return next(t for t in range(start, 300) if t not in seen)


def test_thinking_budget_forces_the_close_and_the_answer_prefix(engine):
    """Budget mode through the native engine (engine/rollout/decoding.py): greedy with a budget of 3 thinking
    tokens = plain greedy for 3 tokens, then '</think>' + the answer prefix (forced: marked, log-prob 0), then
    greedy again on the full context — the full-forward reference of that context."""
    from engine.rl.decoding import DecodingPlan, ThinkingBudget
    from engine.rollout.decoding import generate_with_plan

    reqs = prompts_and_tiles()
    params = SamplingParams(temperature=0, max_tokens=12)
    think = generate_with_plan(engine, reqs, params, DecodingPlan("think", "think"))
    end = _unused_id(think)  # a '</think>' this model never says by itself: the budget must close it
    prefix = (end + 1, end + 2)
    budget = generate_with_plan(engine, reqs, params, DecodingPlan("budget", "think", budget=ThinkingBudget(3, (end,), prefix)))
    for req, t, b in zip(reqs, think, budget):
        (tc,), (bc,) = t.completions, b.completions
        assert tc.forced is None and len(tc.token_ids) == 12  # think: 12 thinking tokens, never closed
        assert bc.token_ids[:6] == tc.token_ids[:3] + [end, *prefix] and len(bc.token_ids) == 12
        assert bc.sampled() == [True] * 3 + [False] * 3 + [True] * 6 and bc.logprobs[3:6] == [0.0] * 3
        tiles = req.images if isinstance(req.images, torch.Tensor) else None
        ref_ids, ref_lps = full_forward_greedy(engine.model, engine.tp_group, engine.vocab_size,
                                               req.prompt_token_ids + bc.token_ids[:6], 6, tiles)
        assert bc.token_ids[6:] == ref_ids
        torch.testing.assert_close(torch.tensor(bc.logprobs[6:]), torch.tensor(ref_lps), rtol=0, atol=2e-5)
    # a model that closes its thinking within the budget is left alone: '</think>' = its 2nd greedy token
    first = think[0].completions[0].token_ids
    early = generate_with_plan(engine, reqs[:1], params, DecodingPlan("budget", "think",
                                                                      budget=ThinkingBudget(3, (first[1],), prefix)))
    assert early[0].completions[0].token_ids == first and early[0].completions[0].forced is None


def test_thinking_budget_with_sampling_and_stop_tokens(engine):
    """n samples per prompt, seeded: every sample thinks at most `budget` sampled tokens before '</think>';
    a stop token inside the thinking ends the sample there (nothing forced)."""
    from engine.rl.decoding import DecodingPlan, ThinkingBudget
    from engine.rollout.decoding import generate_with_plan

    reqs = prompts_and_tiles()
    plain = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=10))
    end = _unused_id(plain, start=250)
    stop = plain[1].completions[0].token_ids[1]  # prompt 1 (greedy) stops inside its thinking
    plan = DecodingPlan("budget", "think", budget=ThinkingBudget(4, (end,)))
    sampled = generate_with_plan(engine, reqs, SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=3), plan)
    for r in sampled:
        assert len(r.completions) == 3
        for c in r.completions:
            close = c.token_ids.index(end) if end in c.token_ids else len(c.token_ids)
            assert close <= 4 and (close == len(c.token_ids) or not c.sampled()[close])
    greedy = generate_with_plan(engine, reqs[1:2], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]), plan)
    c, ids = greedy[0].completions[0], plain[1].completions[0].token_ids
    assert c.token_ids == ids[: ids.index(stop) + 1] and c.finish_reason == "stop" and c.forced is None
