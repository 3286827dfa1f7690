"""SIFA (docs/sifa.md §1–2): deformable inter-frame correlation / aggregation and the SIFA block."""

from .functional import deform_aggregation, deform_attention, deform_correlation
from .modules import SIFA

__all__ = ["SIFA", "deform_aggregation", "deform_attention", "deform_correlation"]
