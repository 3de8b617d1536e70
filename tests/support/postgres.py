"""A real PostgreSQL for tests: re-exports :mod:`relayrl_localstack.postgres`.

The launcher lives in the local stack package so that the demo and the benchmarks
use the same one; tests keep importing ``support.postgres``.
"""

from relayrl_localstack.postgres import (
    DATABASE,
    SUPERUSER,
    SYSTEM_USER,
    PostgresMissingError,
    PostgresServer,
    bin_dir,
    free_port,
    running,
)

__all__ = [
    "DATABASE",
    "SUPERUSER",
    "SYSTEM_USER",
    "PostgresMissingError",
    "PostgresServer",
    "bin_dir",
    "free_port",
    "running",
]
