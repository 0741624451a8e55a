"""Privacy: keys and trust, the message envelope and its codec, TLS certificates, checks of
received tensors, differential privacy (mechanisms, DP-SGD, the ledger, a silo's DP over a
run).

It sits above sdk (whose interfaces it implements, e.g. sdk.training.TrainingPrivacy) and
below silo_agent and aggregator, which use it; it imports nothing above sdk."""
