"""Set a recipe up at its real world size on one CPU process, with no memory: the layout check.

torch's fake process-group backend (`torch.testing._internal.distributed.fake_pg`: collectives are no-ops) stands
in for a world of N GPUs; megatron's parallel state is initialised for one chosen rank of each pipeline stage,
and that stage is built on the meta device (no storage). What is checked, per stage: the TP x PP x DP split, the
LLM layers the stage holds (contiguous, all of them over the stages), the vision encoder on stage 0 and the
output layer on the last, every tensor-parallel shard = full / TP, and the static memory per GPU
(parameters, fp32 gradient buffers, Adam states sharded by the distributed optimizer, a frozen reference copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

GiB = 2**30
# Adam with the distributed optimizer: fp32 master copy (bf16/fp16 params only) + exp_avg + exp_avg_sq, 4 B each
_ADAM_STATE_BYTES = 8
_MASTER_BYTES = 4
_GRAD_BYTES = 4  # megatron DDP grad buffers in fp32 (grad_reduce_in_fp32=True, engine/parallel/wrap.py)


@dataclass
class StageReport:
    stage: int
    rank: int
    layers: list[int]  # global LLM layer numbers (1-based) built on this stage
    has_vision: bool
    has_output_layer: bool
    params: int  # this GPU's parameters
    trainable: int
    static_gib: float  # params + grads + optimizer shard (+ frozen reference) on this GPU
    problems: list[str] = field(default_factory=list)


@dataclass
class LayoutReport:
    recipe: str
    world_size: int
    tp: int
    pp: int
    dp: int
    stages: list[StageReport]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(not s.problems for s in self.stages)

    @property
    def max_static_gib(self) -> float:
        return max(s.static_gib for s in self.stages)

    @property
    def total_params(self) -> int:
        return sum(s.params for s in self.stages) * self.tp


def _init_fake_world(rank: int, world_size: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def _teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_shards(model, tp: int, cfg) -> list[str]:
    """Every TP-split LLM/vision matrix holds 1/TP of its full size along its partition dim."""
    llm, problems = cfg.model.llm, []
    head_dim = llm.hidden_size // llm.num_attention_heads
    expected_rows = {
        "self_attention.linear_qkv.weight": (llm.num_attention_heads + 2 * llm.num_query_groups) * head_dim,
        "mlp.linear_fc1.weight": 2 * llm.ffn_hidden_size,  # SwiGLU [gate; up]
        "embedding.word_embeddings.weight": llm.padded_vocab_size(tp),
        "output_layer.weight": llm.padded_vocab_size(tp),
    }
    for name, p in model.named_parameters():
        for suffix, rows in expected_rows.items():
            if name.startswith("llm.") and name.endswith(suffix) and p.shape[0] * tp != rows:
                problems.append(f"{name}: {p.shape[0]} rows x TP {tp} != {rows}")
        if getattr(p, "tensor_model_parallel", False) and p.shape[p.partition_dim] == 0:
            problems.append(f"{name}: empty shard")
    return problems


@dataclass(frozen=True)
class _StageShape:
    """What a meta build of one stage tells (cached: recipes that differ in freezing, data or optimiser only share it)."""

    params: tuple[tuple[str, int], ...]  # (name, numel) of this GPU's parameters
    layers: tuple[int, ...]
    has_vision: bool
    has_output_layer: bool
    groups: tuple[int, int, int, int]  # megatron's (TP, PP, DP, pipeline rank) for the built rank
    problems: tuple[str, ...]


_SHAPES: dict[str, _StageShape] = {}


def _static_bytes(shape: _StageShape, cfg, dp: int, reference: bool) -> tuple[int, int, int]:
    from engine.model.transformer_configs import torch_dtype

    dtype = torch_dtype(cfg.model.params_dtype)
    width = torch.empty((), dtype=dtype).element_size()
    frozen = {"vision": cfg.model.vision.freeze, "projector": cfg.model.projector.freeze, "llm": cfg.model.llm.freeze}
    params = sum(n for _, n in shape.params)
    trainable = sum(n for name, n in shape.params if not frozen.get(name.split(".")[0], False))
    master = _MASTER_BYTES if dtype != torch.float32 else 0
    shard = dp if cfg.parallel.use_distributed_optimizer else 1
    total = params * width + trainable * _GRAD_BYTES + trainable * (master + _ADAM_STATE_BYTES) // shard
    if reference:  # MPO's pi_0 / GRPO's KL reference: a frozen copy of the policy
        total += params * width
    return params, trainable, total


def _build_stage(cfg, world_size: int, stage: int) -> _StageShape:
    import json

    from megatron.core import parallel_state

    from engine.config import to_dict
    from engine.model.build import build_vlm
    from engine.parallel.init import initialize

    model_arch = to_dict(cfg.model)
    for part in ("vision", "projector", "llm"):
        model_arch[part].pop("freeze")
    key = json.dumps([model_arch, to_dict(cfg.parallel), to_dict(cfg.performance), cfg.train.recompute_activations,
                      world_size, stage], sort_keys=True)
    if key in _SHAPES:
        return _SHAPES[key]
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    rank = stage * tp * dp  # megatron's default order tp-cp-ep-dp-pp: TP fastest, PP slowest
    _init_fake_world(rank, world_size)
    try:
        pg = initialize(p, seed=cfg.train.seed)
        groups = (dist.get_world_size(pg.tp), dist.get_world_size(pg.pp), dist.get_world_size(pg.dp),
                  parallel_state.get_pipeline_model_parallel_rank())
        with torch.device("meta"):
            model = build_vlm(cfg, pg, pre_process=stage == 0, post_process=stage == pp - 1, cuda=True)
        problems = _check_shards(model, tp, cfg)
        if any(t.device.type != "meta" for t in model.parameters()):
            problems.append("a parameter was allocated off the meta device")
        shape = _StageShape(tuple((n, t.numel()) for n, t in model.named_parameters()),
                            tuple(layer.layer_number for layer in model.llm.decoder.layers), model.vision is not None,
                            model.llm.post_process, groups, tuple(problems))
    finally:
        _teardown()
    _SHAPES[key] = shape
    return shape


def _needs_reference(cfg) -> bool:
    stage = cfg.train.stage
    return stage == "mpo" or (stage == "grpo" and cfg.algorithm.grpo.kl_coef > 0)


def check_layout(cfg, world_size: int, recipe: str = "") -> LayoutReport:
    """Build every pipeline stage of `cfg` on meta at `world_size` (one rank per stage: TP rank 0, DP rank 0)."""
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    problems = []
    if world_size % (tp * pp):
        return LayoutReport(recipe, world_size, tp, pp, 0, [], [f"world size {world_size} is not a multiple of "
                                                                   f"TP x PP = {tp} x {pp}"])
    dp = world_size // (tp * pp)
    if cfg.train.stage == "grpo":
        if pp != 1:
            problems.append("GRPO runs with PP=1 (engine/train/grpo.py rejects pipeline parallel: the rollout weight "
                            "push and the native engine need the whole LLM on one stage)")
        if cfg.algorithm.grpo.prompts_per_episode % dp:
            problems.append(f"{cfg.algorithm.grpo.prompts_per_episode} prompts per episode do not split over DP={dp}")
        if world_size % cfg.rollout.tensor_parallel_size:
            problems.append(f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size} does not divide "
                            f"the world size {world_size}")
    else:
        try:
            cfg.train.num_microbatches(dp)
        except ValueError as e:
            problems.append(str(e))
    stages = []
    for stage in range(pp):
        shape = _build_stage(cfg, world_size, stage)
        params, trainable, static = _static_bytes(shape, cfg, dp, _needs_reference(cfg))
        report = StageReport(stage, stage * tp * dp, list(shape.layers), shape.has_vision, shape.has_output_layer,
                             params, trainable, static / GiB, list(shape.problems))
        if shape.groups != (tp, pp, dp, stage):
            report.problems.append(f"megatron groups (TP, PP, DP, stage) = {shape.groups}, expected {(tp, pp, dp, stage)}")
        if report.has_vision != (stage == 0 and not cfg.model.text_only):
            report.problems.append("the vision encoder must be on stage 0 only")
        stages.append(report)
    built = [n for s in stages for n in s.layers]
    if built != list(range(1, cfg.model.llm.num_layers + 1)):
        problems.append(f"stages hold LLM layers {built[:3]}...{built[-3:]} ({len(built)}), not 1..{cfg.model.llm.num_layers}")
    return LayoutReport(recipe, world_size, tp, pp, dp, stages, problems)
