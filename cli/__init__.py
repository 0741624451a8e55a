"""The `fedsilo` command line: the top of the package.

Flags, output, progress and error texts only; every command calls into the packages below
(`simulation`, `provision`, `silo_agent`, `aggregator`, `privacy`, `sdk`)."""
