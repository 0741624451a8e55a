"""The coordinator side: collect uploads, aggregate, assign experts, publish plans.

`coordinator` is the round engine over any `Transport` (publish, offer uploads, close),
`service` the restartable process with roster, deadlines and checkpoints, `config`
federation.toml, `report`/`history` what a run writes and reads back. Above `sdk` and
`privacy`, beside `silo_agent`, below `simulation`, `provision` and `cli`."""
