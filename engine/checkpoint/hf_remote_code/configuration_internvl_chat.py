"""InternVL-chat configuration: an InternViT encoder, an MLP connector (`mlp1`) and an LLM.

Written by vlm-reason-engine's `mcore-to-hf --layout internvl_chat` so that the checkpoint loads
offline with `trust_remote_code=True` (the model is in modeling_internvl_chat.py; vLLM brings its own).
Fields and defaults are those of InternVL's InternVLChatConfig. The LLM config is any transformers
config, chosen by its `model_type` (else its architecture).
"""

from transformers import AutoConfig, PretrainedConfig

from .configuration_intern_vit import InternVisionConfig

# LLM architecture -> transformers model_type, for llm_config dicts that carry no model_type
_LLM_TYPES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}


def _llm_config(c) -> PretrainedConfig:
    if isinstance(c, PretrainedConfig):
        return c
    c = dict(c or {})
    arch = (c.get("architectures") or ["Qwen2ForCausalLM"])[0]
    model_type = c.pop("model_type", None) or _LLM_TYPES.get(arch)
    if model_type is None:
        raise ValueError(f"llm_config: architecture {arch!r} has no model_type; add llm_config.model_type")
    return AutoConfig.for_model(model_type, **c)


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": AutoConfig}
    # vLLM and transformers look for the LLM as `text_config`; config.json spells it `llm_config`
    attribute_map = {"text_config": "llm_config"}

    def __init__(  # defaults: InternVL's InternVLChatConfig (note ps_version v1); exports write every field
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora: int = 0,
        use_llm_lora: int = 0,
        pad2square: bool = False,
        select_layer: int = -1,  # hidden state of the ViT that feeds the connector (-1: last block)
        force_image_size: int | None = None,
        downsample_ratio: float = 0.5,  # pixel shuffle: 2x2 patches -> one token of 4x the width
        template: str | None = None,
        dynamic_image_size: bool = False,
        use_thumbnail: bool = False,
        ps_version: str = "v1",
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        img_context_token_id: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(vision_config, InternVisionConfig):
            vision_config = InternVisionConfig(**(vision_config or {}))
        self.vision_config = vision_config
        self.llm_config = _llm_config(llm_config)
        self.select_layer = select_layer
        self.downsample_ratio = downsample_ratio
        self.ps_version = ps_version
        self.force_image_size = force_image_size
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.template = template
        self.img_context_token_id = img_context_token_id
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square


class SkyworkChatConfig(InternVLChatConfig):
    """Skywork-R1V: the same configuration under Skywork's model_type (vLLM: `SkyworkR1VChatModel`).
    In this file, not its own: transformers 4.x copies only a module's direct relative imports."""

    model_type = "skywork_chat"

    # Needed, not redundant: transformers 5 gives a config subclass without its own __init__ a generated
    # one that skips InternVLChatConfig.__init__ (vision_config / llm_config would stay plain dicts).
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
