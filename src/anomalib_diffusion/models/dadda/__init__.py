"""D-ADDA: distributed anomaly detection with client-side defect generation (Coscia et al., IEEE Systems Journal 2025)."""

from .lightning_model import DADDA
from .torch_model import DADDAModel, DefectDetector, DefectGenerator
from .type_head import DefectTypeStatistics, pooled_type_head

__all__ = ["DADDA", "DADDAModel", "DefectDetector", "DefectGenerator", "DefectTypeStatistics", "pooled_type_head"]
