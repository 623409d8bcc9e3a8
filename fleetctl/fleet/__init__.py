"""Fleet-wide flows over apply: rollouts in waves with gates and rollback, driver moves, drift audits, and
runs split into slices on an engine. They change hosts only through apply's executor."""
