"""A real nats-server for tests: re-exports :mod:`relayrl_localstack.natsserver`.

The launcher lives in the local stack package so that the demo and the benchmarks
use the same one; tests keep importing ``support.natsserver``.
"""

from relayrl_localstack.natsserver import (
    NatsServer,
    NatsServerMissingError,
    binary,
    free_port,
)

__all__ = ["NatsServer", "NatsServerMissingError", "binary", "free_port"]
