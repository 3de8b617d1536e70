"""RelayRL Fleet operator: reconciles Agent custom resources into actor fleets."""

__version__ = "0.1.0"
