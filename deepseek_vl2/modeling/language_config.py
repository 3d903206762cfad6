"""Configuration of the DeepSeek-V2 / DeepSeekMoE language model inside DeepSeek-VL2.

The field names and defaults are those of the released `language_config` block of config.json,
so that configs round-trip unchanged. Defaults describe DeepSeek-V2, not any VL2 release: the
releases set every field that matters explicitly.
"""
import torch
from transformers import PretrainedConfig

KNOWN_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
KNOWN_SCORING_FUNCS = ("softmax", "sigmoid")
DTYPE_KEYS = ("torch_dtype", "dtype")  # the checkpoint dtype's key before transformers 5, and from it


class ConfigError(ValueError):
    """A config value the model cannot be built from; the message names its key."""


def check_section_values(config_class, values: dict, section: str) -> None:
    """Raise ConfigError naming `<section>.<key>` for a value of `values` (one config.json section, for
    `config_class`) that the model cannot be built from: an integer field (`config_class.INTEGER_FIELDS`;
    null allowed for those in `NULLABLE_FIELDS`) that is not an integer, or a dtype that is not one."""
    for name in config_class.INTEGER_FIELDS:
        value = values.get(name)
        if name not in values or (value is None and name in config_class.NULLABLE_FIELDS):
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{section}.{name} must be an integer, not {value!r}")
    check_dtype_values(values, section)


def check_dtype_values(values: dict, section: str = "") -> None:
    """Raise ConfigError for a `torch_dtype` / `dtype` value that does not name a torch dtype."""
    for name in DTYPE_KEYS:
        value = values.get(name)
        if value is None or isinstance(value, torch.dtype):
            continue
        if not isinstance(value, str) or not isinstance(getattr(torch, value.replace("torch.", ""), None), torch.dtype):
            key = f"{section}.{name}" if section else name
            raise ConfigError(f"{key}={value!r} is not a torch dtype (float32, bfloat16 or float16)")


class DeepseekV2Config(PretrainedConfig):
    model_type = "deepseek_v2"
    keys_to_ignore_at_inference = ["past_key_values"]
    # A plain class attribute, so that transformers 5.x's `rope_scaling` property (which rewrites the
    # value into its own `rope_parameters` format) does not apply: the checkpoints store the legacy
    # form and this library reads it as such.
    rope_scaling = None
    INTEGER_FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
        "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace", "max_position_embeddings",
    )
    NULLABLE_FIELDS = ("num_key_value_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank", "q_lora_rank",
                       "n_group", "topk_group", "num_experts_per_tok")

    def __init__(
        self,
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=32,
        n_shared_experts=None,
        n_routed_experts=None,
        ep_size=1,
        routed_scaling_factor=1.0,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        topk_method="gready",  # sic: the official default (docs/deviations.md#kept-on-purpose); the releases set it
        n_group=None,
        topk_group=None,
        num_experts_per_tok=None,
        moe_layer_freq=1,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=100000,
        eos_token_id=100001,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        use_mla=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.ep_size = ep_size
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = float(rms_norm_eps)
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_mla = use_mla
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has a routed-expert MLP (else a dense MLP)."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def validate_for_model(self) -> None:
        """Raise a clear error for settings the model cannot run (checked when a model is built)."""
        if self.n_routed_experts is not None:
            if self.topk_method not in KNOWN_TOPK_METHODS:
                raise ConfigError(
                    f"language_config.topk_method={self.topk_method!r} is not supported; "
                    f"expected one of {KNOWN_TOPK_METHODS}"
                )
            if self.scoring_func not in KNOWN_SCORING_FUNCS:
                raise ConfigError(
                    f"language_config.scoring_func={self.scoring_func!r} is not supported; "
                    f"expected one of {KNOWN_SCORING_FUNCS}"
                )
            if self.num_experts_per_tok is None:
                raise ConfigError("language_config.num_experts_per_tok must be set for a MoE model")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(
                    f"language_config.num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                    f"language_config.n_routed_experts={self.n_routed_experts} (the experts each token is sent to)"
                )
        if self.use_mla and (self.qk_rope_head_dim <= 0 or self.kv_lora_rank is None):
            raise ConfigError("use_mla=true needs qk_rope_head_dim > 0 and kv_lora_rank set")
        if not self.use_mla and self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be divisible by num_attention_heads")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "dynamic", "yarn"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (linear, dynamic, yarn)")
            if kind == "yarn" and not self.use_mla:
                raise ConfigError("rope_scaling type 'yarn' is only supported with use_mla=true")
