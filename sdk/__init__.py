"""The bottom of the package: what silo agents and the aggregator share.

Adapter layers (`adapters`, `amole`, `lease`), strategies, the aggregation math, data,
evaluation, models, local training, messages and wire format, transports. It imports no
other fedsilo package (`tests/test_layering.py`): where it needs something a package above
provides (differential privacy for training), it declares the interface
(`training.TrainingPrivacy`) and the caller passes an implementation."""
