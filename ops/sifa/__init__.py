"""SIFA (docs/sifa.md §1–2): deformable inter-frame correlation / aggregation and the SIFA block.

functional.py (the public ops and backend dispatch), reference.py (plain PyTorch), kernels.py (the
kernels' custom ops and their dispatch to the variant's launchers: simple_kernels.py, fast_kernels.py),
modules.py (the ``SIFA`` block).
"""

from .functional import deform_aggregation, deform_attention, deform_correlation
from .modules import SIFA

__all__ = ["SIFA", "deform_aggregation", "deform_attention", "deform_correlation"]
