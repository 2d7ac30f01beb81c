"""The local stack is real: a Kafka broker with consumer groups, a PostgreSQL server, Dagster on PostgreSQL."""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from planpipe.kafka_config import consumer_config, producer_config
from planpipe.settings import REPO_ROOT, Settings
from planpipe.stack.errors import port_in_use
from planpipe.stack.kafka import topic_configs
from planpipe_tests.ports import free_port_block


def _produce(settings: Settings, count: int, partitions: int) -> None:
    producer = Producer(producer_config(settings, **{"linger.ms": 50}))
    payload = b'{"plan": "' + b"x" * 2000 + b'"}'
    for i in range(count):
        producer.produce(settings.topic, value=payload, key=f"standard:q{i}".encode(), partition=i % partitions)
    assert producer.flush(30) == 0


def test_produce_consume_commit_and_exact_lag(settings: Settings) -> None:
    partitions = settings.partitions
    _produce(settings, 600, partitions)  # batched (linger) and zstd-compressed on the wire
    consumer = Consumer(consumer_config(settings, settings.consumer_group))
    consumer.subscribe([settings.topic])
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 250 and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=50, timeout=1.0):
            assert message.error() is None
            seen += 1
            consumer.store_offsets(message)
    consumer.commit(asynchronous=False)
    committed = consumer.committed([TopicPartition(settings.topic, p) for p in range(partitions)], timeout=10)
    consumer.close()

    lag = 0
    committed_total = 0
    for tp in committed:
        low, high = consumer_watermarks(settings, tp.partition)
        assert high == 100  # 600 messages round-robin over 6 partitions
        offset = tp.offset if tp.offset >= 0 else low
        committed_total += offset
        lag += high - offset
    assert committed_total == seen
    assert lag == 600 - seen


def consumer_watermarks(settings: Settings, partition: int) -> tuple[int, int]:
    probe = Consumer(consumer_config(settings, settings.consumer_group + "-probe"))
    try:
        low, high = probe.get_watermark_offsets(TopicPartition(settings.topic, partition), timeout=10)
        return int(low), int(high)
    finally:
        probe.close()


def test_topics_have_runbook_settings(settings: Settings) -> None:
    # confluent_kafka.admin re-exports ConfigResource without listing it (same ignore as planpipe/stack/kafka.py).
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    from planpipe.stack.kafka import admin

    client = admin(settings)
    metadata = client.list_topics(timeout=10).topics
    for topic, expected in topic_configs(settings).items():
        assert len(metadata[topic].partitions) == settings.partitions
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        actual = client.describe_configs([resource])[resource].result(10)
        for key, value in expected.items():
            assert actual[key].value == value, (topic, key)
    assert topic_configs(settings)[settings.topic]["compression.type"] == "zstd"
    assert topic_configs(settings)[settings.topic]["retention.ms"] == str(7 * 24 * 3600 * 1000)


def test_schema_is_migrated(pg: psycopg.Connection[tuple[object, ...]]) -> None:
    tables = {
        row[0] for row in pg.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'planpipe'")
    }
    assert {"query_catalog", "plan_catalog", "plan_baselines", "plan_rollups_hourly", "consumer_offsets",
            "ingest_batches", "schema_migrations"} <= tables  # fmt: skip
    indexes = {row[0] for row in pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'planpipe'")}
    assert "plan_baselines_query_version" in indexes
    libraries = pg.execute("SHOW shared_preload_libraries").fetchone()
    assert libraries is not None and "auto_explain" in str(libraries[0])


def test_migrations_are_idempotent(stack_settings: Settings) -> None:
    from planpipe.db.migrate import applied_versions, discover, migrate

    assert migrate(stack_settings.pg_dsn) == []
    assert applied_versions(stack_settings.pg_dsn) == [m.version for m in discover()]


def test_dagster_instance_uses_postgres(stack_settings: Settings) -> None:
    code = (
        "from dagster import DagsterInstance; i = DagsterInstance.get();"
        "print(type(i.run_storage).__name__, type(i.event_log_storage).__name__, type(i.schedule_storage).__name__)"
    )
    env = dict(os.environ, DAGSTER_HOME=str(stack_settings.dagster_home),
               PLANPIPE_DAGSTER_PG_DSN=stack_settings.dagster_pg_dsn)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"]


def _planpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planpipe.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _stack_processes(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(home) in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A scratch directory the PostgreSQL service user can enter when the tests run as root.

    pytest's tmp_path lives under a private (0700) directory, which `planpipe up` must not open up.
    """
    base = REPO_ROOT / ".planpipe"
    base.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="stack-test-", dir=base))
    scratch.chmod(0o755)  # created by this fixture
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


def _local_env(home: Path, **extra: str) -> dict[str, str]:
    kafka_port = free_port_block(2)
    pg_port = free_port_block(1)
    while pg_port in (kafka_port, kafka_port + 1):
        pg_port = free_port_block(1)
    env = dict(os.environ, PLANPIPE_HOME=str(home), PLANPIPE_KAFKA_PORT=str(kafka_port),
               PLANPIPE_KAFKA_CONTROLLER_PORT=str(kafka_port + 1), PLANPIPE_PG_PORT=str(pg_port),
               PLANPIPE_PARTITIONS="2", **extra)  # fmt: skip
    env.pop("PLANPIPE_KAFKA_BOOTSTRAP", None)
    env.pop("PLANPIPE_PG_DSN", None)
    return env


def test_up_twice_down_and_up_again(reachable_dir: Path) -> None:
    """A separate stack on its own ports: up is idempotent, down leaves nothing, up after down keeps data."""
    home = reachable_dir / "home"
    env = _local_env(home)
    kafka_port = int(env["PLANPIPE_KAFKA_PORT"])
    try:
        first = _planpipe(env, "up", "--json")
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["bootstrap_servers"] == f"127.0.0.1:{kafka_port}"
        assert report["topics"] == {"query-plans": 2, "query-plans.dlq": 2}
        pids_before = {p.pid for p in _stack_processes(home)}

        second = _planpipe(env, "up", "--json")
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["migrations_applied"] == []
        assert {p.pid for p in _stack_processes(home)} == pids_before

        status = _planpipe(env, "status", "--json")
        assert status.returncode == 0
        assert json.loads(status.stdout)["kafka"]["answering"] is True

        with psycopg.connect(report["pg_dsn"], autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS public.kept (x int)")

        assert _planpipe(env, "down").returncode == 0
        assert _stack_processes(home) == []
        assert _planpipe(env, "status").returncode == 1

        # right after down, on the same ports (the broker's old connections are in TIME-WAIT)
        again = _planpipe(env, "up", "--json")
        assert again.returncode == 0, again.stderr
        with psycopg.connect(report["pg_dsn"], autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('public.kept') IS NOT NULL").fetchone() == (True,)
    finally:
        _planpipe(env, "down")
    assert _stack_processes(home) == []


def test_up_and_status_never_print_secrets(stack_settings: Settings) -> None:
    """A DSN with a password and SASL secrets: `up` and `status` (text and JSON, debug logging) mask them."""
    pg_secret, sasl_secret, key_secret = "pg-S3cret-pw", "sasl-S3cret-pw", "key-S3cret-pw"
    dsn = f"postgresql://postgres:{pg_secret}@127.0.0.1:{stack_settings.pg_port}/planpipe"
    env = dict(os.environ, PLANPIPE_HOME=str(stack_settings.home), PLANPIPE_PG_DSN=dsn,
               PLANPIPE_KAFKA_BOOTSTRAP=stack_settings.kafka_bootstrap, PLANPIPE_LOG_LEVEL="DEBUG",
               PLANPIPE_KAFKA__SASL_USERNAME="svc", PLANPIPE_KAFKA__SASL_PASSWORD=sasl_secret,
               PLANPIPE_PRODUCER__SSL_KEY_PASSWORD=key_secret)  # fmt: skip
    env.pop("PLANPIPE_DAGSTER_PG_DSN", None)
    outputs = {args: _planpipe(env, *args) for args in (("up", "--json"), ("up",), ("status", "--json"), ("status",))}
    for args, result in outputs.items():
        assert result.returncode == 0, (args, result.stderr)
        for secret in (pg_secret, sasl_secret, key_secret):
            assert secret not in result.stdout + result.stderr, args

    masked = f"postgresql://postgres:***@127.0.0.1:{stack_settings.pg_port}"
    up = json.loads(outputs["up", "--json"].stdout)
    assert up["pg_dsn"] == f"{masked}/planpipe"
    assert up["dagster_pg_dsn"] == f"postgresql+psycopg2://postgres:***@127.0.0.1:{stack_settings.pg_port}/dagster"
    assert f"PostgreSQL DSN          : {masked}/planpipe (external)" in outputs["up",].stdout
    status = json.loads(outputs["status", "--json"].stdout)
    assert status["postgres"]["answering"] is True and status["postgres"]["dsn"] == f"{masked}/planpipe"
    assert status["kafka"]["client_options"]["producer"] == {
        "sasl.username": "svc", "sasl.password": "***", "ssl.key.password": "***"}  # fmt: skip
    assert f"{masked}/planpipe" in outputs["status",].stdout


def test_up_that_cannot_start_kafka_stops_postgres_and_says_why(reachable_dir: Path) -> None:
    """Kafka's port is taken: up exits non-zero with one clear line and leaves no PostgreSQL behind.

    The home is created with umask 077: planpipe may open up the directories it creates itself.
    """
    home = reachable_dir / "new" / "home"
    env = _local_env(home)
    kafka_port, pg_port = int(env["PLANPIPE_KAFKA_PORT"]), int(env["PLANPIPE_PG_PORT"])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.bind(("127.0.0.1", kafka_port))
            squatter.listen()
            result = subprocess.run([sys.executable, "-m", "planpipe.cli", "up"], env=env, capture_output=True,
                                    text=True, timeout=300, umask=0o077)  # fmt: skip
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.splitlines()[0] == (
            f"planpipe up: Kafka cannot start: 127.0.0.1:{kafka_port} is already in use by another process "
            "(choose a free port with PLANPIPE_KAFKA_PORT=…); stopped PostgreSQL again"
        )
        # PostgreSQL had started (the directories planpipe created were made reachable) and is gone again
        assert (home / "postgres" / "data" / "PG_VERSION").exists()
        assert _stack_processes(home) == []
        assert not port_in_use(pg_port)
        assert stat.S_IMODE(reachable_dir.stat().st_mode) == 0o755
    finally:
        _planpipe(env, "down")
    assert _stack_processes(home) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as a service user")
def test_up_never_changes_the_mode_of_a_directory_it_did_not_create(reachable_dir: Path) -> None:
    private = reachable_dir / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    env = _local_env(private / "home")
    result = _planpipe(env, "up")
    assert result.returncode == 2
    line = result.stderr.splitlines()[0]
    assert f"cannot enter {private} (mode 0700)" in line and f"chmod o+x {private}" in line, line
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert _stack_processes(private / "home") == []


def _without_planpipe_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANPIPE_", "DAGSTER_"))}
    return env


def test_dagster_definitions_validate_in_the_repository_root() -> None:
    """A Dagster user's first command, with no DAGSTER_HOME and no planpipe environment."""
    dagster = str(Path(sys.executable).with_name("dagster"))
    result = subprocess.run([dagster, "definitions", "validate"], cwd=REPO_ROOT, env=_without_planpipe_environment(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PLANPIPE_DAGSTER_PG_DSN" not in output
    assert "All code locations passed validation" in output
    assert not (REPO_ROOT / "dagster.yaml").exists() and not (REPO_ROOT / "dagster.yml").exists()


def test_dagster_dev_in_the_repository_root_serves_the_code_location(tmp_path: Path) -> None:
    dagster = str(Path(sys.executable).with_name("dagster"))
    port = free_port_block(1)
    log = tmp_path / "dagster-dev.log"
    with log.open("w") as out:
        process = subprocess.Popen([dagster, "dev", "-p", str(port)], cwd=REPO_ROOT,
                                   env=_without_planpipe_environment(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        location = _wait_for_code_location(port, process)
        assert location == {"name": "planpipe", "status": "LOADED"}
    finally:
        _stop_process_tree(process)
        output = log.read_text(errors="replace")
        for match in re.finditer(r"Using temporary directory (\S+) for storage", output):
            shutil.rmtree(match.group(1), ignore_errors=True)
    assert "PostProcessingError" not in output and "PLANPIPE_DAGSTER_PG_DSN" not in output, output[-3000:]


def _wait_for_code_location(port: int, process: "subprocess.Popen[bytes]", timeout_s: float = 180) -> dict[str, str]:
    query = b'{"query": "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"}'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "dagster dev exited"
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=5) as response:
                entries = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
            if entries and entries[0]["loadStatus"] == "LOADED":
                return {"name": entries[0]["name"], "status": entries[0]["loadStatus"]}
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError("the Dagster webserver did not load the code location")


def _stop_process_tree(process: "subprocess.Popen[bytes]") -> None:
    """Stop `dagster dev` and every process it started."""
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=15)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=15)
