"""Checkpoints: HF <-> megatron dist checkpoint conversion for the VLM (see docs/checkpoints.md).

keymap      the one table of our names <-> HF names, and q/k/v / gate-up fusion
hf_config   config.json <-> ModelConfig per part
adapters    one adapter per HF layout (internvl, internvl_chat, qwen2, internvit)
hf_io       lazy safetensors reading, sharded writing
hf_rows     our tensors / row ranges of them from HF safetensors, by plain reads (no mmap)
lazy_save   a megatron dist checkpoint written piece by piece (torch DCP), no model tensors held
mcore_io    dist checkpoint save/load at any TP/PP + metadata; streaming group reader
dcp_slices  any block of a dist checkpoint's stored tensors, read with torch DCP in one process
vit_padding loading into a model whose ViT heads are padded for another TP size
sharding    TP-correct sharded state dict for the ViT / connector
conversion_config  the engine Config a conversion builds models from
convert     streaming hf -> mcore / mcore -> hf / assembly
parity      logits of our model vs transformers (or an export's own modeling code)
hf_remote_code  configuration + modeling code an internvl_chat export carries (AutoConfig / AutoModel)
atomic      all-or-nothing output directories
"""
