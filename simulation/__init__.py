"""The one-process simulation: C silo agents and one aggregator in one thread.

It sits above `silo_agent` and `aggregator` (it runs the real ones, over
`MemoryTransport`) and below `cli`, which only parses flags and draws progress, as
Flower keeps `flwr.simulation` apart from its CLI. `config` holds its flat settings
(torch-free: the CLI reads their defaults), `engine` runs a simulation; `state` is its
per-round checkpoint and the checks `--resume` makes.
"""
