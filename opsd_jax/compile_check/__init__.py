"""`opsd-jax compile-check`: a config's programs compiled for its TPU topology without a TPU.

libtpu (the `[tpu]` extra) compiles for a slice described by name (`v5p:4x4x2`,
`opsd_jax.sharding.topology`); the compiled programs report per-chip memory, FLOPs, XLA's TPU cost model
and, in their HLO, every collective. `programs` builds every program a run compiles from abstract inputs
at the config's shapes, `hlo` reads collectives out of the HLO, `report` turns it into a table and JSON,
`cli` is the command.
"""
