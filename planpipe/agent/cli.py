"""`planpipe agent`: registered by `planpipe.cli` through `add_parsers(sub)`."""

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg

from planpipe.agent.config import AgentConfig, load_file
from planpipe.capture.explain import connect, server_cluster_id
from planpipe.capture.logparse import LogFormat
from planpipe.capture.reader import cluster_id_near
from planpipe.settings import Settings

DESCRIPTION = """\
One long-running capture process per database cluster: tails the auto_explain log (file or
log directory, across rotation) and optionally samples the top pg_stat_statements statements
live; publishes through the router and producer (spool on a Kafka outage, Redis as the last
resort); the log cursor moves only once a batch is acknowledged or durable. Metrics and
/health on 127.0.0.1:--http-port. Stops on SIGTERM/SIGINT after the batch in hand.
Configuration: --config FILE.toml (or PLANPIPE_AGENT_CONFIG), keys = flag names with '_'; flags win.
"""


def _resolve_cluster_id(config: AgentConfig) -> str | None:
    if config.cluster_id:
        return config.cluster_id
    if config.dsn:
        with connect(config.dsn) as conn:
            return server_cluster_id(conn)
    return cluster_id_near(config.log) if config.log is not None else None


def _agent(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.agent.runner import Agent

    config_path = args.config or os.environ.get("PLANPIPE_AGENT_CONFIG", "").strip() or None
    overrides: dict[str, Any] = {
        key: getattr(args, key)
        for key in vars(args)
        if key not in ("config", "handler", "command") and getattr(args, key) is not None
    }
    try:
        config = (load_file(Path(config_path)) if config_path else AgentConfig()).merged(overrides)
    except (OSError, ValueError) as error:
        print(f"planpipe agent: {error}", file=sys.stderr)
        return 2
    if config.log is None and not config.sample:
        print("planpipe agent: nothing to capture: give --log and/or --sample with --dsn", file=sys.stderr)
        return 2
    if config.sample and not config.dsn:
        print("planpipe agent: --sample needs --dsn (the database to sample)", file=sys.stderr)
        return 2
    try:
        cluster_id = _resolve_cluster_id(config)
    except psycopg.Error as error:
        print(f"planpipe agent: cannot read the cluster id from --dsn: {error}", file=sys.stderr)
        return 2
    if not cluster_id:
        print("planpipe agent: cannot tell the cluster: pass --cluster-id or --dsn", file=sys.stderr)
        return 2
    agent = Agent(config, settings, name=config.name or cluster_id, cluster_id=cluster_id)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: agent.stop.set())
    print(f"planpipe agent {agent.name}: cluster {cluster_id}, state {agent.state_dir}", file=sys.stderr, flush=True)
    try:
        agent.run()
    except OSError as error:  # an unreadable log directory, a full disk under the state: one line, not a trace
        print(f"planpipe agent {agent.name}: {error}", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "agent",
        help="capture agent beside one database cluster: auto_explain log + live sampling → Kafka",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    p.add_argument("--config", metavar="FILE.toml", help="configuration file (default: PLANPIPE_AGENT_CONFIG)")
    p.add_argument("--name", help="agent name (state, capture ids, counts); default: the cluster id")
    p.add_argument("--cluster-id", dest="cluster_id", help="default: system_identifier via --dsn or the data dir")
    p.add_argument("--log", type=Path, metavar="FILE|DIR", help="auto_explain log file or PostgreSQL's log directory")
    p.add_argument("--format", dest="log_format", choices=["auto", *(f.value for f in LogFormat)])
    p.add_argument("--log-timezone", dest="log_timezone", help="log_timezone for ambiguous zone abbreviations")
    p.add_argument("--all-files", dest="all_files", action="store_const", const=True,
                   help="first start on a directory: read every log file, not only the newest")  # fmt: skip
    p.add_argument("--state-dir", dest="state_dir", type=Path, help="default: $PLANPIPE_HOME/agent/<name>")
    p.add_argument("--dsn", help="the database beside the agent (sampling; cluster id)")
    p.add_argument("--http-port", dest="http_port", type=int, help="metrics + /health on 127.0.0.1 (default 9465)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--poll-interval", dest="poll_interval_s", type=float, metavar="S")
    p.add_argument("--cooldown", dest="cooldown_s", type=float, metavar="S", help="producer breaker cool-down")
    p.add_argument("--sample", action="store_const", const=True, help="sample pg_stat_statements' top statements")
    p.add_argument("--sample-interval", dest="sample_interval_s", type=float, metavar="S")
    p.add_argument("--sample-max-statements", dest="sample_max_statements", type=int, metavar="N")
    p.add_argument("--sample-statement-timeout", dest="sample_statement_timeout_ms", type=int, metavar="MS")
    p.add_argument("--sample-budget-pct", dest="sample_budget_pct", type=float, metavar="PCT",
                   help="share of each interval the sampled statements may run (default 1)")  # fmt: skip
    p.add_argument("--allow-superuser", dest="allow_superuser", action="store_const", const=True)
    p.add_argument("--spool-max-rows", dest="spool_max_rows", type=int)
    p.add_argument("--spool-max-bytes", dest="spool_max_bytes", type=int)
    p.add_argument("--spool-max-age", dest="spool_max_age_s", type=float, metavar="S")
    p.add_argument("--redis-ttl", dest="redis_ttl_s", type=float, metavar="S")
    p.add_argument("--redis-max-entries", dest="redis_max_entries", type=int)
    p.add_argument("--inflight-settle", dest="inflight_settle_s", type=float, metavar="S",
                   help="after a crash, wait this long past the dead process's last heartbeat before looking "
                   "for its in-flight records in Kafka (default: producer request.timeout.ms + 5 s)")  # fmt: skip
    p.add_argument("--mode-refresh", dest="mode_refresh_s", type=float, metavar="S",
                   help="re-read the broker-health fallback mode this often (default 15)")  # fmt: skip
    p.set_defaults(handler=_agent)
