"""collect_episode for real (one process, the tiny recipe's model, the native engine, generated prompts): the
decoding mode reaches the rollouts. nothink: the prompts do not open '<think>' and the responses differ;
budget: every response thinks at most `thinking_budget` sampled tokens, then '</think>' + the answer prefix
are forced (not sampled: out of the loss); think: the untrained model thinks to the length limit."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.data.visual_reasoning import write_demo_set
from tests.engine.rollout.tiny import single_process_dist_env

BUDGET, MAX_TOKENS, G = 4, 24, 4
THINK_OPEN, THINK_CLOSE = 867, 868  # '<think>', '</think>' in assets/tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize, shutdown

    mp = pytest.MonkeyPatch()
    single_process_dist_env(mp)
    data = tmp_path_factory.mktemp("episode")
    write_demo_set(data, 4, seed=0)
    base = [f"data.train_path={data / 'rl.jsonl'}", "train.init_from=", "rollout.backend=native", "data.shuffle=false",
            f"algorithm.grpo.max_response_length={MAX_TOKENS}", f"algorithm.grpo.group_size={G}",
            f"algorithm.grpo.rollouts_per_episode={2 * G}", "algorithm.grpo.mini_batch_size=1",
            f"train.global_batch_size={G}", "algorithm.grpo.dynamic_sampling=false",
            "algorithm.reward.name=format"]  # the rewards do not matter here (and need no math-verify workers)
    cfg = load_config("recipes/tiny_cpu_grpo.yaml", base)
    pg = initialize(cfg.parallel, seed=0)
    yield base, pg, build_for_this_stage(cfg, pg)
    shutdown()
    mp.undo()


def _episode(tiny, *overrides):
    from engine.data.loader import build_rl_prompt_iterator
    from engine.rl.rewards import build_reward_from_config
    from engine.rollout.factory import build_rollout_engine
    from engine.train.grpo_episode import PromptSource, collect_episode

    base, pg, model = tiny
    cfg = load_config("recipes/tiny_cpu_grpo.yaml", base + list(overrides))
    data = build_rl_prompt_iterator(cfg, 2)
    engine = build_rollout_engine(cfg, model, pg, tokenizer=data.ctx.tokenizer.hf)
    reward = build_reward_from_config(cfg.algorithm.reward)
    return collect_episode(engine, PromptSource(data, 2), reward, cfg, step=0, seed=5)


def _thinking(sample) -> int:
    """Sampled tokens before the first '</think>' (the whole response if it never closes)."""
    ids = sample.response_ids
    return ids.index(THINK_CLOSE) if THINK_CLOSE in ids else len(ids)


def test_decoding_modes_change_the_rollouts(tiny):
    think = _episode(tiny)
    budget = _episode(tiny, "algorithm.decoding.mode=budget", f"algorithm.decoding.thinking_budget={BUDGET}",
                      "algorithm.decoding.answer_prefix='Answer:'")
    nothink = _episode(tiny, "algorithm.decoding.mode=nothink", "data.thinking=no_think",
                       "algorithm.reward.prompt_opens_think=false")
    assert len(think.samples) == len(budget.samples) == len(nothink.samples) == 2 * G

    # think: the prompt opens '<think>'; the untrained policy never closes it and runs to the limit
    assert all(THINK_OPEN in s.prompt_ids[-3:] for s in think.samples)
    think_lengths = [_thinking(s) for s in think.samples]
    assert all(n == len(s.response_ids) == MAX_TOKENS for n, s in zip(think_lengths, think.samples)), think_lengths

    # budget: at most BUDGET thinking tokens, then '</think>Answer:' forced (not sampled, not learned)
    from transformers import AutoTokenizer

    prefix = AutoTokenizer.from_pretrained("assets/tiny_tokenizer").encode("Answer:", add_special_tokens=False)
    for s in budget.samples:
        close = _thinking(s)
        assert close == BUDGET and len(s.response_ids) <= MAX_TOKENS, s.response_ids
        forced = slice(close, close + 1 + len(prefix))
        assert s.response_ids[forced] == [THINK_CLOSE] + prefix
        assert s.sampled[forced] == [False] * (1 + len(prefix)) and all(s.sampled[:close])
        assert not any(s.learned()[forced]) and s.rollout_logprobs[forced] == [0.0] * (1 + len(prefix))
    budget_lengths = [_thinking(s) for s in budget.samples]
    print(f"thinking tokens per response: think {think_lengths}, budget {budget_lengths}")
    assert sum(budget_lengths) < sum(think_lengths)

    # nothink: no '<think>' in the prompt; the same seeds then give other responses
    assert all(THINK_OPEN not in s.prompt_ids for s in nothink.samples)
    assert [s.prompt_ids[:-2] for s in think.samples] == [s.prompt_ids for s in nothink.samples]  # minus '<think>\n'
    assert all(s.prompt_ids[-2] == THINK_OPEN for s in think.samples)
    assert [s.response_ids for s in nothink.samples] != [s.response_ids for s in think.samples]
    assert torch.isfinite(nothink.advantages).all()
