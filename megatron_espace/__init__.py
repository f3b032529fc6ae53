"""megatron-espace: ESPACE activation-projection compression for Megatron models.

See README.md. The public names below are those of DESIGN section 5.
"""

from megatron_espace.layers import ESPACEColumnParallelLinear, ESPACERowParallelLinear

__all__ = ["ESPACEColumnParallelLinear", "ESPACERowParallelLinear"]
