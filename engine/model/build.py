"""Build the VLM (or the LLM alone) for one pipeline stage from the typed config."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt import GPTModel

from engine.model.projector import Projector
from engine.model.specs import backend_for, llm_layer_spec
from engine.model.transformer_configs import llm_transformer_config, vision_transformer_config
from engine.model.vision import InternViT
from engine.model.vlm import VLM


def build_vlm(cfg, pg_collection, pre_process: bool = True, post_process: bool = True, cuda: bool | None = None,
              vp_stage: int | None = None) -> VLM:
    """cfg: the root Config. pg_collection: megatron ProcessGroupCollection from engine.parallel.

    Built where the default device says (CPU, or meta inside `with torch.device("meta")`); placing it on the
    GPU is `engine.parallel.device.place_module`'s job (build_for_this_stage does both). `cuda` resolves the
    performance switches for a machine with/without a GPU (default: this one). `vp_stage`: which virtual pipeline
    chunk of this rank's stage (parallel.virtual_pipeline_model_parallel_size > 1)."""
    mcfg, pcfg = cfg.model, cfg.parallel
    perf = cfg.performance.resolve(cfg, cuda=cuda)
    if torch.get_default_device().type == "meta":
        # megatron's GPU init allocates on torch.cuda.current_device() explicitly; its CPU init follows the
        # default device, so a meta build takes that path and allocates nothing
        perf = dataclasses.replace(perf, cpu_initialization=True)
    tp = pcfg.tensor_model_parallel_size
    chunks = pcfg.pipeline_model_parallel_size * pcfg.virtual_pipeline_model_parallel_size  # layer chunks in all
    llm_tcfg = llm_transformer_config(mcfg, pcfg, perf=perf, train_cfg=cfg.train)
    llm = GPTModel(
        config=llm_tcfg,
        transformer_layer_spec=llm_layer_spec(mcfg.transformer_impl, layers_per_stage=mcfg.llm.num_layers // chunks),
        vocab_size=mcfg.llm.padded_vocab_size(tp),
        max_sequence_length=mcfg.llm.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-parallel; the loss reduces across TP
        share_embeddings_and_output_weights=mcfg.llm.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(mcfg.llm.rope_theta),
        # the VLM merges image embeddings into the full sequence first, then scatters it for sequence parallel
        scatter_embedding_sequence_parallel=False,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    vision = projector = None
    if pre_process and not mcfg.text_only:
        backend = backend_for(mcfg.transformer_impl)
        vit_tcfg = vision_transformer_config(mcfg, pcfg, perf=perf)
        vision = InternViT(vit_tcfg, mcfg.vision, backend, tp_group=pg_collection.tp, recompute=perf.recompute_vision)
        projector = Projector(
            vit_tcfg, mcfg.projector, mcfg.vision.hidden_size, mcfg.llm.hidden_size, backend, tp_group=pg_collection.tp
        )
    model = VLM(llm, vision, projector, image_token_id=mcfg.image_token_id, tokens_per_tile=mcfg.tokens_per_tile,
                tp_group=pg_collection.tp)
    model.freeze(vision=mcfg.vision.freeze, projector=mcfg.projector.freeze, llm=mcfg.llm.freeze)
    return model


def build_for_this_stage(cfg, pg_collection) -> VLM:
    """pre/post process from this rank's pipeline position; placed on this rank's compute device (its GPU)."""
    if cfg.parallel.virtual_pipeline_model_parallel_size > 1:
        raise ValueError("with parallel.virtual_pipeline_model_parallel_size > 1 a rank holds several model chunks: "
                         "use build_model_chunks")
    return build_model_chunks(cfg, pg_collection)[0]


def build_model_chunks(cfg, pg_collection) -> list[VLM]:
    """This rank's model chunks, placed on its compute device: one per virtual pipeline stage (interleaved 1F1B;
    chunk v of pipeline rank r holds layer block v * PP + r), else one. The vision encoder and connector live in
    the first chunk of the first stage, the output layer in the last chunk of the last stage."""
    import torch.distributed as dist

    from engine.parallel.device import place_module

    pp_group = pg_collection.pp
    rank, size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    return [place_module(build_vlm(cfg, pg_collection, pre_process=rank == 0 and v == 0,
                                   post_process=rank == size - 1 and v == vpp - 1, vp_stage=v if vpp > 1 else None))
            for v in range(vpp)]
