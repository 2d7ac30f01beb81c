"""Secrets never reach output or logs: mask DSN passwords and secret librdkafka options.

Shared vocabulary: the stack scripts, the CLI, the engine and the Dagster wiring all
print connection details, and all of them go through these functions first.

    mask_dsn("postgresql://u:pw@db/plans")        → "postgresql://u:***@db/plans"
    mask_dsn("host=db user=u password='p w'")     → "host=db user=u password=***"
    mask_kafka_config({"sasl.password": "pw"})    → {"sasl.password": "***"}
    mask_text("connect to postgresql://u:pw@db failed") → "connect to postgresql://u:***@db failed"
"""

import re
from collections.abc import Mapping
from typing import Final, TypeVar

MASK: Final = "***"

# libpq connection parameters that carry a secret (key=value form and URL query parameters).
_DSN_SECRET_KEYS: Final = ("password", "sslpassword")

# librdkafka properties that librdkafka itself treats as sensitive, plus the Python client's `ssl_key`.
KAFKA_SECRET_OPTIONS: Final = frozenset(
    {
        "sasl.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
        "ssl_key",
    }
)
# Any other option whose name says it holds a secret (new librdkafka versions, plugins).
_SECRET_NAME: Final = re.compile(r"password|passwd|secret|passphrase|private\.key", re.IGNORECASE)

_KEY_VALUE_SECRET: Final = re.compile(
    r"(?P<key>\b(?:" + "|".join(_DSN_SECRET_KEYS) + r")\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&'#]+)",
    re.IGNORECASE,
)
# scheme://user:password@ inside free text: the password runs up to the last '@' before whitespace.
_URL_USERINFO: Final = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*:)(?P<password>\S*)(?P<at>@)")


def mask_dsn(dsn: str) -> str:
    """A PostgreSQL DSN (URL or key=value form) with every password replaced by `***`."""
    scheme, slashes, rest = dsn.partition("://")
    if slashes:
        base, question, query = rest.partition("?")
        userinfo, at, hosts = base.rpartition("@")
        if at:
            user, colon, _password = userinfo.partition(":")
            base = f"{user}{colon}{MASK if colon else ''}@{hosts}"
        rest = base + question + _KEY_VALUE_SECRET.sub(rf"\g<key>{MASK}", query)
        return f"{scheme}://{rest}"
    return _KEY_VALUE_SECRET.sub(rf"\g<key>{MASK}", dsn)


def mask_text(text: str) -> str:
    """Free text (an error message, a log line) with DSN passwords masked wherever they appear."""
    masked = _URL_USERINFO.sub(rf"\g<head>{MASK}\g<at>", text)
    return _KEY_VALUE_SECRET.sub(rf"\g<key>{MASK}", masked)


def is_secret_option(name: str) -> bool:
    """Whether a librdkafka option (or any `key`) holds a secret whose value must not be shown."""
    return name.lower() in KAFKA_SECRET_OPTIONS or bool(_SECRET_NAME.search(name))


V = TypeVar("V")


def mask_kafka_config(config: Mapping[str, V]) -> dict[str, V | str]:
    """A copy of a librdkafka configuration fit for printing: secret values become `***`,
    and a DSN-like value (`scheme://user:pw@…`) loses its password."""
    masked: dict[str, V | str] = {}
    for name, value in config.items():
        if is_secret_option(name):
            masked[name] = MASK
        elif isinstance(value, str):
            masked[name] = mask_text(value)
        else:
            masked[name] = value
    return masked
