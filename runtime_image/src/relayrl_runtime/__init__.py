"""RelayRL Fleet actor runtime.

The process that runs inside every actor pod, and a library that works on its own:
a multi-actor agent API with batched inference, hot-reloadable models, trajectory
recording and sinks. `spec` and `config` are light modules the operator imports too.
"""

__version__ = "0.1.0"
