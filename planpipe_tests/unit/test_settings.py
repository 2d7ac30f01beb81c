import pytest

from planpipe.settings import _with_database, librdkafka_passthrough, load_settings


def test_defaults_point_at_the_local_stack() -> None:
    settings = load_settings({})
    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert (settings.kafka_port, settings.kafka_controller_port, settings.pg_port) == (19092, 19093, 15432)
    assert not settings.kafka_external and not settings.pg_external
    assert settings.pg_dsn.endswith("@127.0.0.1:15432/planpipe")
    assert settings.dagster_pg_dsn == "postgresql+psycopg2://postgres@127.0.0.1:15432/dagster"
    assert (settings.topic, settings.dlq_topic) == ("query-plans", "query-plans.dlq")
    assert (settings.batch_max_messages, settings.batch_max_wait_s) == (500, 0.25)


def test_default_ports_are_below_the_ephemeral_range() -> None:
    # Linux gives client sockets source ports from 32768–60999 (net.ipv4.ip_local_port_range).
    settings = load_settings({})
    assert all(port < 32768 for port in (settings.kafka_port, settings.kafka_controller_port, settings.pg_port))


def test_external_services_are_used_as_given() -> None:
    settings = load_settings(
        {
            "PLANPIPE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "PLANPIPE_PG_DSN": "postgresql://u:p@db:5432/plans?sslmode=require",
        }
    )
    assert settings.kafka_external and settings.kafka_bootstrap == "k1:9092,k2:9092"
    assert settings.pg_external
    assert settings.dagster_pg_dsn == "postgresql+psycopg2://u:p@db:5432/dagster?sslmode=require"


def test_librdkafka_options_pass_through_with_scope() -> None:
    env = {
        "PLANPIPE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "PLANPIPE_KAFKA__SASL_MECHANISM": "PLAIN",
        "PLANPIPE_PRODUCER__LINGER_MS": "5",
        "PLANPIPE_CONSUMER__FETCH_MAX_BYTES": "1048576",
        "PLANPIPE_KAFKA__": "ignored",
        "UNRELATED": "x",
    }
    assert librdkafka_passthrough(env, "producer") == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "linger.ms": "5"}  # fmt: skip
    assert librdkafka_passthrough(env, "consumer") == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "fetch.max.bytes": "1048576"}  # fmt: skip


def test_scoped_option_overrides_common_one() -> None:
    env = {"PLANPIPE_KAFKA__CLIENT_ID": "all", "PLANPIPE_PRODUCER__CLIENT_ID": "producer"}
    assert librdkafka_passthrough(env, "producer") == {"client.id": "producer"}


def test_bad_numbers_name_the_variable() -> None:
    with pytest.raises(ValueError, match="PLANPIPE_PARTITIONS"):
        load_settings({"PLANPIPE_PARTITIONS": "many"})


def test_dsn_must_be_a_url() -> None:
    with pytest.raises(ValueError, match="URL"):
        _with_database("host=db dbname=x", "dagster")


def test_a_bad_dsn_is_named_without_its_password() -> None:
    with pytest.raises(ValueError, match="URL") as error:
        load_settings({"PLANPIPE_PG_DSN": "host=db user=u password=pg-secret dbname=x"})
    assert "pg-secret" not in str(error.value)
    assert "password=***" in str(error.value)
