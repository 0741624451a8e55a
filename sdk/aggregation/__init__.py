"""Aggregator-side math: streaming FedAvg over named tensors (`fedavg`, `robust`), RSEA's
relevance (`rsea`) and its exact assignment program (`assignment`, torch-free, solved in
worker processes by `solver_pool`), FedLEASE's clustering, FDLoRA's outer optimizer.

Import from the modules; this package imports nothing, so a solver worker loads no torch.
"""
