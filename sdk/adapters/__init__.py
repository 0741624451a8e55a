"""Adapter machinery every layer kind shares: the abstract layer (`layer`), the model-level
helpers that speak only its interface (`model`), and the injector with its table from layer
kind to layer class (`inject`).

Why one place: silos, the aggregator, checkpoints and FDLoRA's fusion handle AMoLE's and
FedLEASE's layers alike through this interface. `inject` is imported from its module, not
from here: it knows the kinds (`fedsilo.sdk.amole`, `fedsilo.sdk.lease`), which build on
`layer`, so importing it here would make the packages import each other.
"""
