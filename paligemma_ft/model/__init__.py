"""The PaliGemma model (Flax linen) with big_vision's parameter tree and numerics."""

from paligemma_ft.model.paligemma import Model, make_attn_mask
from paligemma_ft.model.presets import PRESETS, get_preset, infer_config_from_shapes

__all__ = ["Model", "make_attn_mask", "PRESETS", "get_preset", "infer_config_from_shapes"]
