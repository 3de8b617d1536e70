"""The `relayrl-operator` command.

`relayrl-operator crd` prints the Agent CRD generated from the spec models (used by
`make crds`); `relayrl-operator run` starts the operator (added with the operator's
reconcilers).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from relayrl_operator import crd


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="relayrl-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("crd", help="print the Agent CustomResourceDefinition as YAML")
    args = parser.parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(crd.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
