"""The silo side: receive a plan, train locally, evaluate, embed, upload.

`agent` is one round on the local model over any `Transport`, `service` the restartable
process around it, `config` silo.toml. Above `sdk` and `privacy`, beside `aggregator` (the
two sides never import each other), below `simulation`, `provision` and `cli`."""
