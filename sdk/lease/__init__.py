"""FedLEASE's adapter: cluster experts behind an adaptive top-M router. Its layer plugs into
`fedsilo.sdk.adapters` (kind "lease"); its routing math is here, beside it."""

from .layer import LeaseLinear
from .routing import adaptive_top_m, num_slots, slot_experts

__all__ = ["LeaseLinear", "adaptive_top_m", "num_slots", "slot_experts"]
