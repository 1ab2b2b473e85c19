"""MoRA: high-rank updating for parameter-efficient fine-tuning (https://arxiv.org/abs/2405.12130)."""

from .config import MoraConfig
from .layer import MoraLayer, MoraLinear
from .model import MoraModel
from .operators import COMPRESSIONS, MoraOperator, mora_rank

__all__ = ["COMPRESSIONS", "MoraConfig", "MoraLayer", "MoraLinear", "MoraModel", "MoraOperator", "mora_rank"]
