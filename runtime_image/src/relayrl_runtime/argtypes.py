"""argparse value types the command lines share (relayrl-runtime, relayrl-operator)."""

from __future__ import annotations

import argparse


def at_least_one(value: str) -> int:
    """A whole number >= 1; anything else is an argument error saying so."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number
