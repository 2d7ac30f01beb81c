"""A real single-node Apache Kafka broker (KRaft) for development, tests and CI.

The broker jars come from Maven Central through `mvn dependency:copy-dependencies`
on the pom kept beside this module, cached outside git. The broker runs on the
JVM as a detached process; its pid and log live under `$PLANPIPE_HOME/kafka`.
"""

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from planpipe.kafka_config import admin_config, size_limits
from planpipe.redact import mask_kafka_config
from planpipe.settings import Settings
from planpipe.stack.errors import StackError, pid_alive, require_free_ports, tail

POM_DIR: Final = Path(__file__).parent / "kafka_pom"
KAFKA_VERSION: Final = "4.1.1"

# Runbook "Topic Configuration"; replication-dependent values are derived from the cluster.
QUERY_PLANS_RETENTION_MS: Final = 7 * 24 * 3600 * 1000
QUERY_PLANS_RETENTION_BYTES: Final = 100 * 1024**3
PRODUCTION_PARTITIONS: Final = 48


# A topic setting planpipe only ever raises: a larger value set by an operator stays.
MAX_MESSAGE_BYTES: Final = "max.message.bytes"


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Per-topic configuration: the runbook's for `query-plans`; the DLQ keeps everything.

    Both carry the one size limit (`max.message.bytes` from `kafka_config.SizeLimits`):
    the DLQ must take every reject the router or the ingest run sends it.
    """
    min_isr = str(min(2, settings.replication_factor))
    sizes = size_limits(settings).topic_config()
    return {
        settings.topic: {
            "compression.type": "zstd",
            "retention.ms": str(QUERY_PLANS_RETENTION_MS),
            "retention.bytes": str(QUERY_PLANS_RETENTION_BYTES),
            "cleanup.policy": "delete",
            "min.insync.replicas": min_isr,
            **sizes,
        },
        # Routing guide: the DLQ is "a persistent message broker with infinite retention".
        settings.dlq_topic: {
            "compression.type": "zstd",
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "cleanup.policy": "delete",
            "min.insync.replicas": min_isr,
            **sizes,
        },
    }


@dataclass(frozen=True)
class KafkaPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def properties(self) -> Path:
        return self.root / "server.properties"

    @property
    def pid(self) -> Path:
        return self.root / "broker.pid"

    @property
    def log(self) -> Path:
        return self.root / "broker.log"

    @property
    def stdout(self) -> Path:
        return self.root / "broker.stdout"


def _paths(settings: Settings) -> KafkaPaths:
    return KafkaPaths(settings.home / "kafka")


def jars_dir(settings: Settings) -> Path:
    return settings.cache_dir / f"kafka-{KAFKA_VERSION}"


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise StackError(
            f"`{tool}` is not on PATH. The local Kafka broker needs Java 17+ and Maven. "
            "Install them, or point planpipe at an existing cluster with "
            "PLANPIPE_KAFKA_BOOTSTRAP=host:port (nothing is started then)."
        )
    return found


def ensure_jars(settings: Settings) -> Path:
    """Resolve the broker jars once; later calls reuse the cache."""
    target = jars_dir(settings)
    if (target / ".complete").exists():
        return target
    mvn = _require("mvn")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    command = [
        mvn, "-q", "-B", "-f", str(POM_DIR / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
        f"-Dkafka.version={KAFKA_VERSION}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(f"Maven could not resolve the Kafka jars:\n{tail(result.stdout + result.stderr)}")
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _java_command(settings: Settings, main_class: str, *args: str) -> list[str]:
    java = _require("java")
    paths = _paths(settings)
    return [
        java,
        f"-Xms{settings.kafka_heap}",
        f"-Xmx{settings.kafka_heap}",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={POM_DIR / 'log4j2.properties'}",
        f"-Dplanpipe.kafka.log={paths.log}",
        "-cp",
        f"{jars_dir(settings)}/*",
        main_class,
        *args,
    ]


def _write_properties(settings: Settings, paths: KafkaPaths) -> None:
    host = "127.0.0.1"
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{settings.kafka_controller_port}",
        "listeners": f"PLAINTEXT://{host}:{settings.kafka_port},CONTROLLER://{host}:{settings.kafka_controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{settings.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(paths.data),
        "num.partitions": str(settings.partitions),
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "6",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        # Runbook, "Broker Disk Saturation": batch disk writes.
        "log.flush.interval.messages": "100000",
        "log.flush.interval.ms": "10000",
        # The one size limit (kafka_config.SizeLimits): message.max.bytes,
        # replica.fetch.max.bytes, socket.request.max.bytes.
        **size_limits(settings).broker_properties(),
    }
    paths.properties.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))


def is_running(settings: Settings) -> bool:
    pid = read_pid(settings)
    return pid is not None and pid_alive(pid)


def read_pid(settings: Settings) -> int | None:
    try:
        return int(_paths(settings).pid.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def admin(settings: Settings, timeout_s: float = 5.0, *, quiet: bool = False) -> AdminClient:
    extra: dict[str, str | int | bool] = {"socket.timeout.ms": int(timeout_s * 1000)}
    if quiet:
        extra["log_level"] = 0  # probing a broker that is not up yet is expected to fail
    return AdminClient(admin_config(settings, **extra))


def broker_answers(settings: Settings, timeout_s: float = 3.0) -> bool:
    try:
        metadata = admin(settings, timeout_s, quiet=True).list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return bool(metadata.brokers)


def start(settings: Settings, wait_s: float = 90.0) -> bool:
    """Format (first time) and start the broker, then wait until it answers metadata requests.

    Returns whether this call started it (False: external cluster, or already running).
    """
    if settings.kafka_external:
        return False
    paths = _paths(settings)
    if is_running(settings):
        if _wait_for_metadata(settings, wait_s, pid=read_pid(settings)):
            return False
        raise StackError(
            f"Kafka process is running but does not answer on {settings.kafka_bootstrap} (log: {paths.log})",
            tail(paths.log),
        )
    require_free_ports(
        "Kafka",
        {"PLANPIPE_KAFKA_PORT": settings.kafka_port, "PLANPIPE_KAFKA_CONTROLLER_PORT": settings.kafka_controller_port},
    )
    ensure_jars(settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    _write_properties(settings, paths)
    if not (paths.data / "meta.properties").exists():
        cluster_id = _storage_tool(settings, "random-uuid").strip() or str(uuid.uuid4())
        _storage_tool(settings, "format", "-t", cluster_id, "-c", str(paths.properties))
    with paths.stdout.open("ab") as out:
        process = subprocess.Popen(
            _java_command(settings, "kafka.Kafka", str(paths.properties)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI; `planpipe down` stops it
        )
    paths.pid.write_text(str(process.pid))
    if not _wait_for_metadata(settings, wait_s, pid=process.pid):
        stop(settings)
        raise StackError(
            f"Kafka did not come up on {settings.kafka_bootstrap} (log: {paths.log})",
            f"{tail(paths.stdout)}\n{tail(paths.log)}",
        )
    return True


def _storage_tool(settings: Settings, *args: str) -> str:
    result = subprocess.run(
        _java_command(settings, "kafka.tools.StorageTool", *args), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise StackError(f"kafka-storage {' '.join(args)} failed:\n{tail(result.stdout + result.stderr)}")
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("SLF4J")]
    return lines[-1] if lines else ""


def _wait_for_metadata(settings: Settings, wait_s: float, pid: int | None) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if pid is not None and not pid_alive(pid):
            return False
        if broker_answers(settings, timeout_s=2.0):
            return True
        time.sleep(0.5)
    return False


def stop(settings: Settings, wait_s: float = 30.0) -> bool:
    """Stop the local broker (SIGTERM, then SIGKILL). Returns whether one was running."""
    paths = _paths(settings)
    pid = read_pid(settings)
    if pid is None or not pid_alive(pid):
        paths.pid.unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.1)
    paths.pid.unlink(missing_ok=True)
    return True


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> dict[str, int]:
    """Create `query-plans` and its DLQ with the runbook's settings; grow partitions, fix configs.

    Returns the partition count per topic.
    """
    client = admin(settings)
    existing = client.list_topics(timeout=timeout_s).topics
    configs = topic_configs(settings)
    new = [
        NewTopic(name, num_partitions=settings.partitions, replication_factor=settings.replication_factor, config=cfg)
        for name, cfg in configs.items()
        if name not in existing
    ]
    if new:
        for name, future in client.create_topics(new, operation_timeout=timeout_s).items():
            try:
                future.result(timeout_s)
            except KafkaException as error:
                if "TOPIC_ALREADY_EXISTS" not in str(error):
                    raise StackError(f"could not create topic {name}: {error}") from error
    grow = [
        NewPartitions(name, settings.partitions)
        for name in configs
        if name in existing and len(existing[name].partitions) < settings.partitions
    ]
    if grow:
        for future in client.create_partitions(grow).values():
            future.result(timeout_s)
    for name, cfg in configs.items():
        if name in existing:
            _alter_topic(client, name, cfg, timeout_s)
    # Metadata propagates asynchronously after CreateTopics: wait until both topics show up.
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = client.list_topics(timeout=timeout_s).topics
        counts = {name: len(metadata[name].partitions) for name in configs if name in metadata}
        if len(counts) == len(configs) and all(n >= settings.partitions for n in counts.values()):
            return counts
        if time.monotonic() > deadline:
            raise StackError(f"topics not visible in metadata after {timeout_s}s: {counts}")
        time.sleep(0.2)


def _topic_config(client: AdminClient, name: str, timeout_s: float) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    described = client.describe_configs([resource])[resource].result(timeout_s)
    return {key: entry.value for key, entry in described.items()}


def _alter_topic(client: AdminClient, name: str, cfg: dict[str, str], timeout_s: float) -> None:
    """Set the runbook's configs on an existing topic; raise `max.message.bytes` only when smaller.

    Fails with a message that names the topic, the value found and the value
    needed when the size limit cannot be applied (e.g. no ALTER_CONFIGS right on
    an external cluster): records up to the limit would be refused otherwise.
    """
    wanted = dict(cfg)
    needed = int(wanted.pop(MAX_MESSAGE_BYTES))
    found = _topic_config(client, name, timeout_s).get(MAX_MESSAGE_BYTES)
    if found is None or int(found) < needed:
        wanted[MAX_MESSAGE_BYTES] = str(needed)
    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in wanted.items()]
    resource = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=entries)
    try:
        for future in client.incremental_alter_configs([resource]).values():
            future.result(timeout_s)
    except KafkaException as error:
        if MAX_MESSAGE_BYTES not in wanted:
            raise StackError(f"could not update the configuration of topic {name}: {error}") from error
        raise StackError(
            f"topic {name} has {MAX_MESSAGE_BYTES}={found}, smaller than the {needed} bytes "
            f"PLANPIPE_MAX_PLAN_BYTES needs, and planpipe could not raise it: {error}. "
            f"Set {MAX_MESSAGE_BYTES}>={needed} on the topic, or lower PLANPIPE_MAX_PLAN_BYTES."
        ) from error
    # The change reaches DescribeConfigs asynchronously (KRaft metadata): wait for it.
    deadline = time.monotonic() + timeout_s
    while True:
        after = _topic_config(client, name, timeout_s).get(MAX_MESSAGE_BYTES)
        if (after is not None and int(after) >= needed) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if after is None or int(after) < needed:
        raise StackError(
            f"topic {name} still has {MAX_MESSAGE_BYTES}={after} after planpipe raised it to {needed} "
            "(a broker policy?); records up to PLANPIPE_MAX_PLAN_BYTES would be refused"
        )


def status(settings: Settings) -> dict[str, object]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "external": settings.kafka_external,
        "pid": None if settings.kafka_external else read_pid(settings),
        "client_options": {
            "producer": mask_kafka_config(settings.producer_overrides),
            "consumer": mask_kafka_config(settings.consumer_overrides),
        },
        "answering": broker_answers(settings, timeout_s=2.0),
        "log": None if settings.kafka_external else str(_paths(settings).log),
    }
