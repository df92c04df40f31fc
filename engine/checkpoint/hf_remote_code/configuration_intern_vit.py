"""InternViT (vision encoder of InternVL-chat / Skywork-R1V) configuration.

Written by vlm-reason-engine's `mcore-to-hf --layout internvl_chat`; configuration only (no modeling
code: vLLM brings its own InternViT). Field names are those of the published InternViT config.json.
"""

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 14,
        image_size: int = 448,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        qkv_bias: bool = True,
        qk_normalization: bool = False,
        norm_type: str = "layer_norm",  # or "rms_norm" (InternViT-6B)
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu",
        initializer_factor: float = 0.1,  # initial value of the layer scales ls1 / ls2
        initializer_range: float = 0.02,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        use_flash_attn: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.qkv_bias = qkv_bias
        self.qk_normalization = qk_normalization
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.initializer_factor = initializer_factor
        self.initializer_range = initializer_range
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.drop_path_rate = drop_path_rate
        self.use_flash_attn = use_flash_attn
