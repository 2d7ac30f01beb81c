import logging

import pytest

from planpipe.redact import MASK, is_secret_option, mask_dsn, mask_kafka_config, mask_text
from planpipe.settings import load_settings


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:pw@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:pw@host:5432/db?sslmode=require", "postgresql://u:***@host:5432/db?sslmode=require"),
        ("postgres://u:p%40ss@h1:5432,h2:5433/db", "postgres://u:***@h1:5432,h2:5433/db"),
        ("postgresql+psycopg2://u:pw@host/dagster", "postgresql+psycopg2://u:***@host/dagster"),
        # an unencoded '@' or '/' inside the password still stays hidden
        ("postgresql://u:p@ss/w@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u@host/db", "postgresql://u@host/db"),
        ("postgresql://host/db", "postgresql://host/db"),
        ("postgresql:///db?host=/tmp&password=pw&user=u", "postgresql:///db?host=/tmp&password=***&user=u"),
        ("postgresql://u@h/db?sslpassword=keypw", "postgresql://u@h/db?sslpassword=***"),
        ("host=db user=u password=pw dbname=x", "host=db user=u password=*** dbname=x"),
        ("host=db password = 'p w \\' x' dbname=x", "host=db password = *** dbname=x"),
        ("host=db PASSWORD=pw", "host=db PASSWORD=***"),
        ("host=db dbname=x", "host=db dbname=x"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_mask_text_finds_dsns_inside_messages() -> None:
    text = "could not connect to postgresql://app:hunter2@db:5432/plans (password=hunter3 given); retrying"
    masked = mask_text(text)
    assert "hunter2" not in masked and "hunter3" not in masked
    assert masked == "could not connect to postgresql://app:***@db:5432/plans (password=*** given); retrying"
    assert mask_text("plain words, host:port 127.0.0.1:19092") == "plain words, host:port 127.0.0.1:19092"


@pytest.mark.parametrize(
    "name",
    ["sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret",
     "sasl.oauthbearer.config", "ssl.key.pem", "ssl_key", "SASL.PASSWORD", "some.future.secret"],
)  # fmt: skip
def test_secret_kafka_options(name: str) -> None:
    assert is_secret_option(name)


def test_mask_kafka_config_keeps_what_is_not_secret() -> None:
    config: dict[str, object] = {
        "bootstrap.servers": "k1:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "svc",
        "sasl.password": "kafka-secret",
        "ssl.key.password": "key-secret",
        "sasl.oauthbearer.client.secret": "oauth-secret",
        "sasl.oauthbearer.token.endpoint.url": "https://idp:tok-secret@idp.example/token",
        "linger.ms": 5,
        "logger": logging.getLogger("x"),
    }
    masked = mask_kafka_config(config)
    assert masked["sasl.password"] == masked["ssl.key.password"] == masked["sasl.oauthbearer.client.secret"] == MASK
    assert masked["sasl.oauthbearer.token.endpoint.url"] == "https://idp:***@idp.example/token"
    kept = ("bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.username", "linger.ms", "logger")
    assert {k: masked[k] for k in kept} == {k: config[k] for k in kept}
    assert config["sasl.password"] == "kafka-secret"  # a copy: the client still gets the real value
    assert "secret" not in repr(masked).replace("client.secret", "")


def test_settings_repr_hides_passwords_and_sasl_options() -> None:
    settings = load_settings(
        {
            "PLANPIPE_PG_DSN": "postgresql://u:pg-secret@db:5432/plans",
            "PLANPIPE_KAFKA__SASL_PASSWORD": "kafka-secret",
            "PLANPIPE_PRODUCER__SSL_KEY_PASSWORD": "key-secret",
        }
    )
    text = repr(settings)
    for secret in ("pg-secret", "kafka-secret", "key-secret"):
        assert secret not in text
    assert "pg_dsn='postgresql://u:***@db:5432/plans'" in text
    assert "dagster_pg_dsn='postgresql+psycopg2://u:***@db:5432/dagster'" in text
    assert "'sasl.password': '***'" in text
    # the values used to connect are untouched
    assert settings.pg_dsn == "postgresql://u:pg-secret@db:5432/plans"
    assert settings.producer_overrides["sasl.password"] == "kafka-secret"
