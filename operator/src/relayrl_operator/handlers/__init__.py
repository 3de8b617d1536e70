"""Kopf handlers, kept thin: they feed the reconciler and configure Kopf.

Importing this package registers every handler with Kopf's default registry.
"""

from relayrl_operator.handlers import agents, lifecycle

__all__ = ["agents", "lifecycle"]
