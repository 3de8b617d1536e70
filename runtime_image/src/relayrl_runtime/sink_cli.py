"""`relayrl-sink`: the sink processes' entry point (`arrow` and `postgres` subcommands).

The operator runs one Deployment per sink of an Agent with this command; a user can run
it by hand against any NATS. Settings come from flags, with NATS auth/TLS and the
Postgres DSN from environment variables or mounted Secret files
(`streams.ConnectOptions.from_env`, `sinks.postgres.read_dsn`), never from flags that
would show up in `ps`.

    relayrl-sink arrow --namespace default --agent cartpole --path /data/trajectories
    relayrl-sink postgres --namespace default --agent cartpole   # DSN from RELAYRL_PG_DSN*
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from relayrl_runtime import logs, spec, streams, watchdog
from relayrl_runtime.sinks import service


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    """A rotation time: a finite number of seconds, at most a day (the Agent spec's bound;
    a fraction of a second for tests)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 86400], got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def _sql_name(text: str) -> str:
    # Unquoted, as the operator passes them: a name Postgres keeps as written.
    if not re.fullmatch(spec.SQL_IDENT, text):
        raise argparse.ArgumentTypeError(
            f"expected lower-case letters, digits and '_', not starting with a digit,"
            f" at most 63 characters, got {text!r}"
        )
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayrl-sink", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--namespace", default=os.environ.get("RELAYRL_NAMESPACE", "default"))
    common.add_argument("--agent", required=True, help="Agent name.")
    common.add_argument("--stream", default=os.environ.get(streams.ENV_NATS_STREAM))
    common.add_argument(
        "--nats-url",
        default=None,
        help=f"NATS server URL(s), comma separated (default ${streams.ENV_NATS_URL}).",
    )
    common.add_argument("--http-host", default="0.0.0.0")
    common.add_argument("--http-port", type=_port, default=9090, help="0: any free port.")
    common.add_argument("--fetch-batch", type=_at_least(1), default=256)
    common.add_argument(
        "--no-create-stream",
        action="store_true",
        help="Do not create the stream (the operator owns it).",
    )
    common.add_argument("--log-format", choices=["text", "json"], default="text")
    common.add_argument("--log-level", type=str.lower, choices=logs.LEVELS, default="info")
    sub = p.add_subparsers(dest="command", required=True)

    arrow = sub.add_parser("arrow", parents=[common], help="Write Parquet / Arrow IPC files.")
    arrow.add_argument("--path", type=Path, required=True, help="Root directory of the files.")
    arrow.add_argument(
        "--format", choices=[f.value for f in spec.SinkFormat], default=spec.SinkFormat.PARQUET
    )
    arrow.add_argument("--rotate-bytes", type=_at_least(1), default=128 << 20)
    arrow.add_argument("--rotate-seconds", type=_seconds, default=300.0)
    arrow.add_argument(
        "--compression",
        choices=[c.value for c in spec.ParquetCompression],
        default=spec.ParquetCompression.SNAPPY.value,
        help="Parquet codec (default: snappy).",
    )
    arrow.add_argument(
        "--compression-level", type=int, default=None, help="Parquet codec level (its default)."
    )
    arrow.add_argument(
        "--row-group-rows",
        type=_at_least(1),
        default=256 * 1024,
        help="Rows per Parquet row group.",
    )

    pg = sub.add_parser("postgres", parents=[common], help="Write PostgreSQL rows.")
    pg.add_argument(
        "--dsn-file",
        type=Path,
        default=None,
        help="File with the libpq DSN (a mounted Secret); default $RELAYRL_PG_DSN(_FILE).",
    )
    pg.add_argument(
        "--schema", type=_sql_name, default="relayrl", help="Database schema the sink owns."
    )
    pg.add_argument("--table", type=_sql_name, default="steps")
    pg.add_argument("--batch-rows", type=_at_least(1), default=50_000)
    return p


def build(args: argparse.Namespace) -> service.SinkService:
    """The service for parsed arguments (separate for tests)."""
    cfg = service.ServiceConfig(
        namespace=args.namespace,
        agent=args.agent,
        stream=args.stream,
        fetch_batch=args.fetch_batch,
        create_stream=not args.no_create_stream,
        http_host=args.http_host,
        http_port=args.http_port,
    )
    options = streams.ConnectOptions.from_env(
        servers=args.nats_url, name=f"relayrl-sink-{args.command}-{args.agent}"
    )
    writer: service.Writer
    if args.command == "arrow":
        from relayrl_runtime.sinks import arrow_stream

        parquet = arrow_stream.ParquetSettings(
            compression=args.compression,
            compression_level=args.compression_level,
            row_group_rows=args.row_group_rows,
        )
        if args.format == spec.SinkFormat.PARQUET:
            try:
                parquet.check()
            except ValueError as err:
                raise ValueError(f"--compression/--compression-level: {err}") from None
        writer = arrow_stream.ArrowStreamWriter(
            args.path,
            args.agent,
            spec.SinkFormat(args.format),
            rotate_bytes=args.rotate_bytes,
            rotate_seconds=args.rotate_seconds,
            parquet=parquet,
        )
    else:
        from relayrl_runtime.sinks import postgres

        dsn_file: Path | None = args.dsn_file

        def dsn() -> str:
            if dsn_file is not None:
                return postgres.read_dsn_file(dsn_file, "--dsn-file")
            return postgres.read_dsn()

        dsn()  # fail now, with the message, if no DSN is configured at all
        writer = postgres.PostgresWriter(
            dsn,
            stream=streams.stream_name(args.namespace, args.agent, args.stream),
            consumer=streams.durable_name(streams.SinkKind.POSTGRES),
            namespace=args.namespace,
            schema_name=args.schema,
            table=args.table,
            batch_rows=args.batch_rows,
        )
    return service.SinkService(writer, options, cfg)


async def _run(svc: service.SinkService) -> None:
    loop = asyncio.get_running_loop()
    svc.install_signal_handlers(lambda: watchdog.arm(service.EXIT_SECONDS, loop))
    await svc.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: exit 0 after a clean stop, 2 on bad arguments or settings."""
    args = _parser().parse_args(argv)
    logs.setup(args.log_format, logging.getLevelName(args.log_level.upper()))
    log = logging.getLogger("relayrl_runtime.sink_cli")
    try:
        svc = build(args)
    except (service.PermanentError, streams.ConnectError, ValueError, OSError) as err:
        # A bad --agent or --nats-url, an unreadable --dsn-file: say which, no traceback.
        log.error("relayrl-sink %s: %s", args.command, err)
        return 2
    watchdog.install_stack_dump()
    try:
        asyncio.run(_run(svc))
    except (service.PermanentError, streams.ConnectError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
