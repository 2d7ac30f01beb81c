"""`planpipe …`: operate the local stack and run the pipeline stages outside Dagster."""

import argparse
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence

from planpipe.settings import REPO_ROOT, Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]
_COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = handler
        return handler

    return register


# Stage modules add their own sub-commands: add_parsers(sub) registers parsers whose
# `handler` default is a Handler. Keeping them beside their stage keeps this file small.
_STAGE_COMMANDS: tuple[str, ...] = (
    "planpipe.capture.cli",
    "planpipe.agent.cli",
    "planpipe.routing.cli",
    "planpipe.ingest.cli",
    "planpipe.replay.cli",
    "planpipe.plans.cli",
    "planpipe.bench.cli",
    "planpipe.demo.cli",
    "planpipe.loadtest.cli",
)


def _print_json(payload: object) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


@command("up")
def _up(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe import stack
    from planpipe.redact import mask_dsn

    report = stack.up(settings)
    if args.json:
        _print_json(report.as_dict())
        return 0
    print(f"planpipe stack is up ({report.seconds}s)")
    print(f"  Kafka bootstrap servers : {report.bootstrap_servers}"
          f"{' (external)' if settings.kafka_external else ''}")  # fmt: skip
    print(f"  topics                  : {', '.join(f'{t} ({n} partitions)' for t, n in report.topics.items())}")
    print(f"  PostgreSQL DSN          : {report.pg_dsn}{' (external)' if settings.pg_external else ''}")
    if settings.redis_url:
        external = " (external)" if settings.redis_external else ""
        print(f"  Redis (agents' queue)   : {mask_dsn(settings.redis_url)}{external}")
    print(f"  migrations applied now  : {report.migrations_applied or 'none (schema up to date)'}")
    print(f"  DAGSTER_HOME            : {report.dagster_home}")
    print(f"  data directory          : {report.data_dir}")
    return 0


@command("down")
def _down(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe import stack

    result = stack.down(settings)
    if args.purge:
        shutil.rmtree(settings.home, ignore_errors=True)
        result["purged"] = True
    _print_json(result)
    return 0


@command("status")
def _status(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe import stack

    report = stack.status(settings)
    if args.json:
        _print_json(report)
    else:
        kafka_state = report["kafka"]
        pg_state = report["postgres"]
        assert isinstance(kafka_state, dict) and isinstance(pg_state, dict)
        print(f"Kafka      {'up  ' if kafka_state['answering'] else 'down'}  {kafka_state['bootstrap_servers']}")
        print(f"PostgreSQL {'up  ' if pg_state['answering'] else 'down'}  {pg_state['dsn']}")
        redis_state = report["redis"]
        assert isinstance(redis_state, dict)
        if redis_state["enabled"]:
            print(f"Redis      {'up  ' if redis_state['answering'] else 'down'}  {redis_state['url']}")
        print(f"Dagster    home  {report['dagster_home']}")
        print(f"Data       dir   {report['data_dir']}")
    healthy = report["kafka"]["answering"] and report["postgres"]["answering"]  # type: ignore[index]
    return 0 if healthy else 1


@command("migrate")
def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.db.migrate import migrate

    applied = migrate(settings.pg_dsn)
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


@command("dev")
def _dev(args: argparse.Namespace, settings: Settings) -> int:
    """Stack up, demo traffic, and the Dagster webserver + daemon on the planpipe code location.

    Ctrl-C, SIGTERM or SIGHUP stop everything within 15 s: in-flight runs are asked to stop
    (they commit or abandon their batch and end CANCELED), then Dagster's process tree
    (own session, so the terminal's Ctrl-C reaches only us) is stopped, escalating to
    SIGTERM and SIGKILL; nothing is left running.
    """
    from planpipe import stack
    from planpipe.demo import supervise
    from planpipe.demo.agent import start_demo_agent
    from planpipe.demo.cli import dagster_environment, run_traffic_in_background
    from planpipe.demo.codeserver import start_code_server
    from planpipe.demo.traffic import DEMO_CLUSTER

    supervise.children_get_default_signals()  # for what `interrupt_on_termination` does not cover
    with supervise.interrupt_on_termination():
        report = stack.up(settings)
        code_server = start_code_server(settings, dagster_environment(settings), settings.home / "dev-code-server.log")
        print(f"stack up in {report.seconds}s; Dagster UI on http://{args.host}:{args.port} "
              f"(code server log: {code_server.log})", flush=True)  # fmt: skip
        dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or "dagster"
        process = subprocess.Popen(
            [dagster, "dev", "-w", str(code_server.workspace), "-h", args.host, "-p", str(args.port)],
            env=dagster_environment(settings),
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        traffic = None
        agent = None
        instance = None
        try:
            if not args.no_traffic:  # the demo workload's plans reach Kafka through a real agent on the server log
                agent = start_demo_agent(settings, DEMO_CLUSTER, settings.home / "dev-agent.log")
                print(f"planpipe agent for {DEMO_CLUSTER} tails {agent.log.directory} (log: {agent.output})",
                      flush=True)  # fmt: skip
                traffic = run_traffic_in_background(settings)
            instance = supervise.open_instance(settings)  # ready before it is needed to stop runs
            code = process.wait()
            print(f"planpipe dev: dagster dev exited with {code}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            code = 0
        finally:
            with supervise.shielded():
                print("planpipe dev: stopping runs, Dagster and demo traffic ...", file=sys.stderr, flush=True)
                if traffic is not None:
                    traffic[1].set()
                if agent is not None:
                    agent.request_stop()  # it stops while Dagster does
                stopped = supervise.stop(process, code_server=code_server.process, instance=instance)
                if agent is not None:
                    agent.stop(timeout_s=max(0.5, 14.0 - stopped.seconds))
                if traffic is not None:
                    traffic[0].join(timeout=max(0.5, 14.0 - stopped.seconds))
                if instance is not None:
                    instance.dispose()
                print(f"planpipe dev: stopped {json.dumps(stopped.as_dict())}", file=sys.stderr, flush=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start Kafka and PostgreSQL locally (idempotent), apply migrations, create topics")
    p.add_argument("--json", action="store_true", help="print connection details as JSON")
    p = sub.add_parser("down", help="stop the local services")
    p.add_argument("--purge", action="store_true", help="also delete PLANPIPE_HOME (all local data)")
    p = sub.add_parser("status", help="show whether the services answer; exit 1 if not")
    p.add_argument("--json", action="store_true")
    sub.add_parser("migrate", help="apply pending sql/ migrations to PLANPIPE_PG_DSN")
    p = sub.add_parser("dev", help="stack up + Dagster webserver and daemon (the main job)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--no-traffic", action="store_true", help="do not run the demo capture loop")
    for module_name in _STAGE_COMMANDS:
        importlib.import_module(module_name).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("PLANPIPE_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from planpipe.errors import OperatorError
    from planpipe.redact import mask_text

    settings = load_settings()
    try:
        handler: Handler = getattr(args, "handler", None) or _COMMANDS[args.command]
        return handler(args, settings)
    except OperatorError as error:  # StackError, SpoolInUse, ...: one line, no traceback
        print(f"planpipe {args.command}: {mask_text(str(error))}", file=sys.stderr)
        if error.details:
            print(textwrap.indent(mask_text(error.details), "  | "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
