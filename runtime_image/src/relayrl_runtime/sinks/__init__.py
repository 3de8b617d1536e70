"""Trajectory sinks: where routers hand encoded record batches.

`base.TrajectorySink` is the protocol; one module per sink, independent of each other
(`local` writes Parquet/Arrow files; the NATS publisher of the pipeline implements the
same protocol).
"""
