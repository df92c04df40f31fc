"""Build the VLM (or the LLM alone) for one pipeline stage from the typed config."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from engine.model.projector import Projector
from engine.model.specs import backend_for, llm_layer_spec
from engine.model.transformer_configs import llm_transformer_config, vision_transformer_config
from engine.model.vision import InternViT
from engine.model.vlm import VLM


def build_vlm(cfg, pg_collection, pre_process: bool = True, post_process: bool = True) -> VLM:
    """cfg: the root Config. pg_collection: megatron ProcessGroupCollection from engine.parallel."""
    mcfg, pcfg = cfg.model, cfg.parallel
    tp = pcfg.tensor_model_parallel_size
    llm_tcfg = llm_transformer_config(mcfg, pcfg, recompute=cfg.train.recompute_activations, train_cfg=cfg.train)
    llm = GPTModel(
        config=llm_tcfg,
        transformer_layer_spec=llm_layer_spec(mcfg.transformer_impl),
        vocab_size=mcfg.llm.padded_vocab_size(tp),
        max_sequence_length=mcfg.llm.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-parallel; the loss reduces across TP
        share_embeddings_and_output_weights=mcfg.llm.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(mcfg.llm.rope_theta),
        pg_collection=pg_collection,
    )
    vision = projector = None
    if pre_process and not mcfg.text_only:
        backend = backend_for(mcfg.transformer_impl)
        vit_tcfg = vision_transformer_config(mcfg, pcfg)
        vision = InternViT(vit_tcfg, mcfg.vision, backend, tp_group=pg_collection.tp)
        projector = Projector(
            vit_tcfg, mcfg.projector, mcfg.vision.hidden_size, mcfg.llm.hidden_size, backend, tp_group=pg_collection.tp
        )
    model = VLM(llm, vision, projector, image_token_id=mcfg.image_token_id, tokens_per_tile=mcfg.tokens_per_tile)
    model.freeze(vision=mcfg.vision.freeze, projector=mcfg.projector.freeze, llm=mcfg.llm.freeze)
    return model


def build_for_this_stage(cfg, pg_collection) -> VLM:
    """pre/post process from this rank's pipeline position."""
    pp_group = pg_collection.pp
    import torch.distributed as dist

    rank, size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    return build_vlm(cfg, pg_collection, pre_process=rank == 0, post_process=rank == size - 1)
