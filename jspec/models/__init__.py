"""Model families as pure functions over parameter pytrees."""

from jspec.models.config import RopeScaling, TransformerConfig
from jspec.models.model import Model
from jspec.models.transformer import forward, init_params, param_logical_axes

__all__ = ["Model", "RopeScaling", "TransformerConfig", "forward", "init_params", "param_logical_axes"]
