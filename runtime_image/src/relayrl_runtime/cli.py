"""The `relayrl-runtime` console script.

Subcommands: `run --config FILE` (the actor pod process, see `app`), `demo` (CartPole
with a fresh ONNX MLP through the real runtime, then a summary), `simulate` (a remote
simulator: gymnasium envs stepped through a runtime's ZMQ endpoint), and `model export`,
`model push`, `model list` (build a test MLP; the NATS object-store model registry).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nats.errors

from relayrl_runtime import argtypes, errors, spec


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (errors.RelayRLError, spec.InvalidSpecError, OSError) as err:
        print(f"relayrl-runtime: error: {err}", file=sys.stderr)
        return 2
    except (nats.errors.Error, TimeoutError) as err:  # e.g. a server without JetStream
        from relayrl_runtime import streams

        print(f"relayrl-runtime: error: NATS: {streams.describe(err)}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayrl-runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the actor runtime process")
    run.add_argument("--config", type=Path, required=True, help="runtime config YAML")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="CartPole-v1 through the runtime, then a summary")
    demo.add_argument("--actors", type=argtypes.at_least_one, default=4)
    demo.add_argument("--envs-per-actor", type=argtypes.at_least_one, default=4)
    demo.add_argument("--routers", type=argtypes.at_least_one, default=2)
    demo.add_argument(
        "--steps", type=argtypes.at_least_one, default=20_000, help="env steps (all copies)"
    )
    demo.add_argument("--seconds", type=float, default=30.0, help="upper bound on run time")
    demo.add_argument("--out", type=Path, default=None, help="trajectory directory")
    demo.add_argument("--max-length", type=argtypes.at_least_one, default=500)
    demo.set_defaults(func=_demo)

    sim = sub.add_parser("simulate", help="step gymnasium envs through a remote endpoint")
    sim.add_argument(
        "--address", required=True, type=_zmq_address, help="the endpoint, tcp://HOST:PORT"
    )
    sim.add_argument("--env", default="CartPole-v1", help="gymnasium environment id")
    sim.add_argument(
        "--envs", type=argtypes.at_least_one, default=4, help="environment copies (one actor each)"
    )
    sim.add_argument(
        "--steps", type=argtypes.at_least_one, default=None, help="stop after this many env steps"
    )
    sim.add_argument("--seconds", type=_seconds, default=None, help="stop after this long")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--connect-timeout", type=_seconds, default=300.0, help="wait this long for the runtime"
    )
    sim.add_argument("--report-seconds", type=_seconds, default=10.0, help="progress line period")
    sim.set_defaults(func=_simulate)

    model = sub.add_parser("model", help="model directories and the model registry")
    msub = model.add_subparsers(dest="model_command", required=True)
    export = msub.add_parser("export", help="write a small MLP model directory")
    export.add_argument("directory", type=Path)
    export.add_argument("--format", choices=[f.value for f in spec.ModelFormat], default="onnx")
    export.add_argument("--obs-dim", type=argtypes.at_least_one, default=4)
    export.add_argument("--actions", type=argtypes.at_least_one, default=2)
    export.add_argument(
        "--hidden", type=_widths, default=[64, 64], help="comma separated layer widths"
    )
    export.add_argument("--version", type=argtypes.at_least_one, default=1)
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(func=_export)
    push = msub.add_parser("push", help="upload a model directory to the registry")
    push.add_argument("directory", type=Path)
    push.add_argument("--nats", required=True, help="NATS URL")
    push.add_argument("--bucket", required=True)
    push.add_argument("--name", required=True)
    push.add_argument(
        "--force",
        action="store_true",
        help="replace other content under the same version, or push below the newest",
    )
    push.add_argument(
        "--no-check",
        action="store_true",
        help="push without loading the model first (on a host without its backend)",
    )
    push.set_defaults(func=_push)
    lst = msub.add_parser("list", help="list models in a registry bucket")
    lst.add_argument("--nats", required=True)
    lst.add_argument("--bucket", required=True)
    lst.set_defaults(func=_list)
    for registry_command in (push, lst):
        registry_command.add_argument(
            "--connect-timeout", type=_seconds, default=30.0, help="give up on NATS after this long"
        )
    return parser


def _widths(value: str) -> list[int]:
    try:
        return [argtypes.at_least_one(w) for w in value.split(",") if w.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma separated layer widths >= 1, got {value!r}"
        ) from None


def _zmq_address(value: str) -> str:
    if value.startswith("ipc://") and len(value) > len("ipc://"):
        return value
    host, _, port = value.removeprefix("tcp://").rpartition(":")
    if (
        not value.startswith("tcp://")
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT, got {value!r}")
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {value!r}")
    return seconds


def _run(args: argparse.Namespace) -> int:
    from relayrl_runtime import app

    return app.main(args.config)


def _simulate(args: argparse.Namespace) -> int:
    from relayrl_runtime import simulate

    try:
        return simulate.main(args)
    except ValueError as err:  # a bad --env: what was asked for cannot run
        print(f"relayrl-runtime: error: {err}", file=sys.stderr)
        return 2
    except TimeoutError as err:  # no runtime answered
        print(f"relayrl-runtime: error: {err}", file=sys.stderr)
        return 1


def _export(args: argparse.Namespace) -> int:
    from relayrl_runtime.inference import export

    meta = export.export_mlp(
        args.directory,
        spec.ModelFormat(args.format),
        obs_dim=args.obs_dim,
        action_size=args.actions,
        hidden=args.hidden,
        version=args.version,
        seed=args.seed,
    )
    print(f"wrote {args.directory} ({meta.format.value}, version {meta.version})")
    return 0


def _push(args: argparse.Namespace) -> int:
    from relayrl_runtime import registry
    from relayrl_runtime.inference import model

    # A bad name or directory fails before any connection.
    registry.check_names(args.bucket, args.name)
    model.read_metadata(args.directory)
    registry.pack(args.directory)
    if not args.no_check:
        # As a runtime loads it (batches of one and three random rows through it): a
        # model no runtime can load would become the newest, and every pod that
        # starts on it would exit.
        from relayrl_runtime.inference import loader

        try:
            loader.load_policy(args.directory)
        except errors.ModelLoadError as err:
            raise errors.ModelLoadError(
                f"{err} (not pushed; --no-check pushes without loading it here)"
            ) from err

    async def go() -> registry.Entry:
        nc = await registry.connect(args.nats, args.connect_timeout)
        try:
            return await registry.push(nc, args.bucket, args.name, args.directory, args.force)
        finally:
            await nc.close()

    entry = asyncio.run(go())
    print(f"pushed {args.name} version {entry.version} ({entry.size} bytes) to {args.bucket}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from relayrl_runtime import registry

    registry.check_bucket(args.bucket)

    async def go() -> list[registry.Entry]:
        nc = await registry.connect(args.nats, args.connect_timeout)
        try:
            return await registry.list_models(nc, args.bucket)
        finally:
            await nc.close()

    for e in asyncio.run(go()):
        print(f"{e.key}\tversion={e.version}\tformat={e.format}\tsize={e.size}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from relayrl_runtime import agent as agent_mod
    from relayrl_runtime.envs import driver, gym
    from relayrl_runtime.inference import export
    from relayrl_runtime.sinks import local

    with tempfile.TemporaryDirectory(prefix="relayrl-demo-") as tmp:
        model_dir = Path(tmp) / "model"
        export.export_mlp(model_dir, spec.ModelFormat.ONNX, obs_dim=4, action_size=2)
        out = args.out if args.out is not None else Path(tmp) / "trajectories"
        sink = local.LocalFileSink(out, spec.SinkFormat.PARQUET, prefix="demo")
        copies = args.actors * args.envs_per_actor
        agent = agent_mod.Agent(
            model_dir,
            actor_count=copies,
            router_scale=args.routers,
            sink=sink,
            name="demo",
            max_length=args.max_length,
            seed=0,
        )
        env = gym.make("CartPole-v1", copies)
        drv = driver.EnvDriver(agent, env, list(range(copies)), seed=0)
        start = time.perf_counter()
        try:
            stats = drv.run(max_steps=args.steps, max_seconds=args.seconds)
        finally:
            drv.close()
            agent.shutdown()
        wall = time.perf_counter() - start
        summary = {
            "env": "CartPole-v1",
            "model": "onnx mlp 4-64-64-2",
            "actors": args.actors,
            "envs_per_actor": args.envs_per_actor,
            "routers": args.routers,
            "steps": stats.steps,
            "episodes": stats.episodes,
            "mean_return": None if stats.mean_return is None else round(stats.mean_return, 2),
            "steps_per_second": round(stats.steps_per_second),
            "trajectory_rows": sink.rows_written,
            "files": [str(f) for f in sink.files] if args.out is not None else len(sink.files),
            "seconds": round(wall, 2),
        }
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
        print(json.dumps(summary))
    return 0 if stats.steps > 0 and sink.rows_written > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
