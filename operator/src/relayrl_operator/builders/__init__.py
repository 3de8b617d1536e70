"""Pure builders: one module per child kind, each `build(agent, settings) -> dict`.

They take the parsed Agent and the operator settings and return a manifest; they do
no I/O and read no environment, so they are unit-tested without a cluster.
"""
