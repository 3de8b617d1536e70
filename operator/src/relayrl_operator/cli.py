"""The `relayrl-operator` command.

`relayrl-operator run` starts the operator: Kopf watches Agents, the operator's own
watches (watch.py) their children, the reconciler keeps them converged, `/metrics`
serves Prometheus metrics and Kopf's liveness endpoint `/healthz` the probes.
`relayrl-operator crd` prints the Agent CRD generated from the spec models (used by
`make crds`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import kopf
import prometheus_client

from relayrl_operator import crd, kube, metrics, natsadmin, peering, settings
from relayrl_runtime import argtypes, logs

# The pod's IP, from the downward API (the chart sets it).
ENV_POD_IP: Final = "POD_IP"


def _setup_logging(level: str, fmt: str) -> None:
    logs.setup(fmt, logging.getLevelName(level.upper()))
    # Kopf logs every watch event at debug and every handler run at info: at fleet
    # scale that is most of the operator's I/O. Keep Kopf's own lines to warnings
    # unless debugging.
    if logging.getLevelName(level.upper()) > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("kopf").setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> settings.Settings:
    """The environment's settings, with what the flags override."""
    cfg = settings.Settings.from_env(environ)
    if args.runtime_image:
        cfg = dataclasses.replace(cfg, runtime_image=args.runtime_image)
    return cfg


def _bind(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """Where the HTTP endpoints listen: `--bind`, else every address of the pod's family.

    The kubelet probes a pod at its IP, which in an IPv6 cluster 0.0.0.0 does not take:
    `::` then (the chart passes the pod IP as POD_IP). Kopf serves /healthz through
    asyncio, which makes an IPv6 listener IPv6-only; /metrics on `::` takes IPv4 too.
    """
    if args.bind:
        return str(args.bind)
    environ = os.environ if environ is None else environ
    return "::" if ":" in environ.get(ENV_POD_IP, "") else "0.0.0.0"


def _http_url(host: str, port: int, path: str) -> str:
    """An http URL; an IPv6 address goes in brackets."""
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def _run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, args.log_format)
    try:
        cfg = _settings(args)
    except ValueError as err:
        print(f"relayrl-operator: error: {err}", file=sys.stderr)
        return 2
    # Registers the handlers with Kopf's default registry.
    from relayrl_operator import handlers  # noqa: F401

    bind = _bind(args)
    if args.metrics_port >= 0:
        prometheus_client.start_http_server(args.metrics_port, addr=bind, registry=metrics.REGISTRY)
    memo = kopf.Memo()
    memo.config = cfg
    memo.kubeconfig = args.kubeconfig
    memo.workers = args.workers
    memo.namespaces = args.namespace or []
    memo.identity = peering.own_identity()
    memo.streams = natsadmin.NatsStreams(kube.Client.from_config(args.kubeconfig))
    namespaces = args.namespace or []
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=args.standalone,
            peering_name=None if args.standalone else "relayrl-operator",
            identity=cast(Any, memo.identity),
            priority=args.priority,
            liveness_endpoint=_http_url(bind, args.health_port, "/healthz"),
            memo=memo,
        )
    )
    return 0


_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _namespace(value: str) -> str:
    """A namespace name. Kopf would also take a glob pattern, but the peering objects
    are per namespace, and the reconciler must find the ones Kopf uses."""
    if not _NAMESPACE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a namespace name (lowercase letters, digits and '-', at most"
            " 63 characters; patterns are not supported)"
        )
    return value


def parser() -> argparse.ArgumentParser:
    """The command line: `crd` and `run`."""
    parser = argparse.ArgumentParser(prog="relayrl-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    crd_cmd = commands.add_parser("crd", help="print the Agent CustomResourceDefinition as YAML")
    crd_cmd.add_argument("--peering", action="store_true", help="print Kopf's peering CRDs instead")
    run = commands.add_parser("run", help="run the operator")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster or ~/.kube)")
    run.add_argument(
        "--namespace",
        action="append",
        type=_namespace,
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    run.add_argument(
        "--workers", type=argtypes.at_least_one, default=16, help="parallel reconciles (default 16)"
    )
    run.add_argument("--runtime-image", help="runtime image for actor and sink pods")
    run.add_argument(
        "--bind",
        help="address of the HTTP endpoints (default: 0.0.0.0; :: when $POD_IP is an IPv6"
        " address, where /healthz then takes IPv6 connections only)",
    )
    run.add_argument("--metrics-port", type=int, default=8080, help="/metrics port (-1: off)")
    run.add_argument("--health-port", type=int, default=8081, help="/healthz port")
    run.add_argument("--standalone", action="store_true", help="no peering: act even if others run")
    run.add_argument(
        "--priority",
        type=int,
        default=0,
        help="peering priority: a live peer of higher priority pauses this operator, and"
        " peers of equal priority all pause (default 0)",
    )
    run.add_argument("--log-level", type=str.lower, choices=logs.LEVELS, default="info")
    run.add_argument("--log-format", choices=["json", "text"], default="json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = parser().parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(crd.render_peering() if args.peering else crd.render())
        return 0
    return _run(args)


if __name__ == "__main__":
    raise SystemExit(main())
