"""Configurations of the DeepSeek-VL2 wrapper: vision tower, projector, and the top level.

Nesting and defaults follow the released config.json. The vision defaults describe SigLIP-L/16
(kept from the official package: docs/deviations.md#kept-on-purpose); every release overrides them.
"""
from transformers import PretrainedConfig

from .language_config import ConfigError, DeepseekV2Config, check_dtype_values, check_section_values


class VisionEncoderConfig(PretrainedConfig):
    model_type = "vision"
    INTEGER_FIELDS = ("image_size", "patch_size", "width", "layers", "heads", "num_classes")
    NULLABLE_FIELDS = ()

    def __init__(
        self,
        model_name="siglip_large_patch16_384",
        image_size=384,
        patch_size=16,
        width=1024,
        layers=24,
        heads=16,
        mlp_ratio=4,
        global_pool="map",
        ignore_head=True,
        class_token=False,
        num_classes=0,
        use_checkpoint=False,
        **kwargs,
    ):
        self.model_name = model_name
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.layers = layers
        self.heads = heads
        self.mlp_ratio = mlp_ratio
        self.global_pool = global_pool
        self.ignore_head = ignore_head
        self.class_token = class_token
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        super().__init__(**kwargs)


class MlpProjectorConfig(PretrainedConfig):
    model_type = "mlp_projector"
    INTEGER_FIELDS = ("input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio")
    NULLABLE_FIELDS = ()

    def __init__(
        self,
        projector_type="downsample_mlp_gelu",
        input_dim=1152,
        n_embed=2048,
        depth=2,
        mlp_ratio=1,
        downsample_ratio=2,
        **kwargs,
    ):
        self.projector_type = projector_type
        self.input_dim = input_dim
        self.n_embed = n_embed
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.downsample_ratio = downsample_ratio
        super().__init__(**kwargs)


class DeepseekVLV2Config(PretrainedConfig):
    model_type = "deepseek_vl_v2"
    SECTIONS = ("vision_config", "projector_config", "language_config")

    def __init__(
        self,
        # The reference default is the string "tile_tag"; "2D" is what works
        # (docs/deviations.md#tile_tag-defaults-to-2d).
        tile_tag="2D",
        global_view_pos="head",
        candidate_resolutions=((384, 384),),
        vision_config=None,
        projector_config=None,
        language_config=None,
        **kwargs,
    ):
        check_dtype_values(kwargs)
        self.vision_config = _sub_config(VisionEncoderConfig, vision_config, "vision_config")
        self.projector_config = _sub_config(MlpProjectorConfig, projector_config, "projector_config")
        self.language_config = _sub_config(DeepseekV2Config, language_config, "language_config")
        self.tile_tag = tile_tag
        self.global_view_pos = global_view_pos
        self.candidate_resolutions = candidate_resolutions
        super().__init__(**kwargs)

    @classmethod
    def check_sections(cls, values: dict) -> None:
        """Raise ConfigError for a section missing from `values` (a config.json's content): left out,
        it would silently become a default (27B-sized) one."""
        missing = [name for name in cls.SECTIONS if name not in values]
        if missing:
            raise ConfigError(f"no {' or '.join(missing)} section (a DeepSeek-VL2 config has {', '.join(cls.SECTIONS)})")

    def validate_for_model(self) -> None:
        """Raise ConfigError for settings the model cannot run."""
        self.language_config.validate_for_model()


def _sub_config(config_class, value, section: str):
    if isinstance(value, config_class):
        return value
    if value is None:
        return config_class()
    if isinstance(value, PretrainedConfig):
        return config_class(**value.to_dict())
    if not isinstance(value, dict):
        raise ConfigError(f"{section} must be a JSON object, not {type(value).__name__} {value!r}")
    check_section_values(config_class, value, section)
    return config_class(**value)
