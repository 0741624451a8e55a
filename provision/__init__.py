"""Provisioning: from one federation.toml, everything each site needs (broker accounts,
keys, trust files, TLS certificates, the aggregator's federation.toml, each silo's
silo.toml, the kit's README), made by small builders over a shared context.

It writes the aggregator's and the agents' configs, so it sits above silo_agent and
aggregator (and privacy and sdk below them), beside simulation, below cli."""
