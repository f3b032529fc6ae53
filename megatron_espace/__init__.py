"""megatron-espace: ESPACE activation-projection compression for Megatron models.

See README.md. The public names below are those of DESIGN section 5.
"""

import os
import warnings

# megatron-core >= 0.18 runs `git rev-parse` in its own directory on every import to append
# a commit to its version (with a .venv inside a checkout: ours); this turns that off.
os.environ.setdefault("NO_VCS_VERSION", "1")

# megatron-core announces its pure-torch fallbacks on every import; on CPU they are expected.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed")

from megatron_espace.accumulation import defer_weight_grads
from megatron_espace.calibration import CalibrationStatistics, calibrate
from megatron_espace.config import METHODS, ConfigError, ESPACEConfig
from megatron_espace.layers import ESPACEColumnParallelLinear, ESPACERowParallelLinear
from megatron_espace.projection import Projections
from megatron_espace.surgery import (apply_espace, count_parameters, export_compressed,
                                     get_gpt_layer_espace_spec, plan_espace)

__all__ = [
    "CalibrationStatistics", "calibrate", "defer_weight_grads", "METHODS", "ConfigError", "ESPACEConfig", "ESPACEColumnParallelLinear",
    "ESPACERowParallelLinear", "Projections", "apply_espace", "count_parameters",
    "export_compressed",
    "get_gpt_layer_espace_spec", "plan_espace",
]
