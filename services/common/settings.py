"""Typed settings, read from environment variables (and an optional ``.env`` file).

Each field's docstring names its environment variable. Defaults run the embedded
stack on loopback; production points the same services at real Kafka and Redis
(``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL``, SASL/TLS and ACL settings).
Secrets are :class:`pydantic.SecretStr`, so they never appear in logs or reprs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.keys import KeySpace
from contracts.topics import DEFAULT_PARTITIONS

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]


class KafkaSettings(BaseSettings):
    """How to reach Kafka. Every client-specific knob is here so real Kafka can be tuned."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", env_file=".env", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    """``KAFKA_BOOTSTRAP_SERVERS``: comma-separated host:port list."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    """``KAFKA_SECURITY_PROTOCOL``."""
    sasl_mechanism: SaslMechanism | None = None
    """``KAFKA_SASL_MECHANISM``."""
    sasl_username: str | None = None
    """``KAFKA_SASL_USERNAME``."""
    sasl_password: SecretStr | None = None
    """``KAFKA_SASL_PASSWORD``."""
    ssl_cafile: str | None = None
    """``KAFKA_SSL_CAFILE``: CA bundle for TLS."""
    ssl_certfile: str | None = None
    """``KAFKA_SSL_CERTFILE``: client certificate for mutual TLS."""
    ssl_keyfile: str | None = None
    """``KAFKA_SSL_KEYFILE``: client key for mutual TLS."""
    client_id: str = "streamrec"
    """``KAFKA_CLIENT_ID``."""
    fetch_max_wait_ms: int = Field(500, ge=0)
    """``KAFKA_FETCH_MAX_WAIT_MS``: how long the broker holds a fetch that finds no data
    (Kafka's default; a fetch that finds data returns at once, so this costs no latency)."""
    max_poll_interval_ms: int = Field(300_000, ge=1)
    """``KAFKA_MAX_POLL_INTERVAL_MS``: a consumer that does not poll for this long leaves
    its group (Kafka's default; a batch takes milliseconds, a DRN major update < 1 s)."""
    session_timeout_ms: int = Field(10_000, ge=1)
    """``KAFKA_SESSION_TIMEOUT_MS``: a crashed consumer's partitions move after this long."""
    heartbeat_interval_ms: int = Field(3_000, ge=1)
    """``KAFKA_HEARTBEAT_INTERVAL_MS``: at most a third of the session timeout."""
    max_partition_fetch_bytes: int = 4 * 1024 * 1024
    """``KAFKA_MAX_PARTITION_FETCH_BYTES``."""
    linger_ms: int = Field(5, ge=0)
    """``KAFKA_LINGER_MS``: producer batching delay (Kafka 4's default)."""
    request_timeout_ms: int = 30_000
    """``KAFKA_REQUEST_TIMEOUT_MS``."""
    delivery_timeout_ms: int = Field(120_000, ge=1)
    """``KAFKA_DELIVERY_TIMEOUT_MS``: how long a producer retries a record before it
    fails (Kafka's default; at least ``linger_ms + request_timeout_ms``). A consumer
    service whose output failed exits without checkpointing, so nothing is lost."""

    def common(self) -> dict[str, Any]:
        """Connection arguments shared by consumers, producers and admin clients."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                config["sasl_plain_password"] = self.sasl_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if value := getattr(self, name):
                config[name] = value
        return config

    def admin(self) -> dict[str, Any]:
        config = self.common()
        config.pop("request_timeout_ms")
        return config


class RedisSettings(BaseSettings):
    """How to reach Redis or a Redis Cluster (URL, ACL user/password and TLS; kept out of logs)."""

    model_config = SettingsConfigDict(env_prefix="REDIS_", env_file=".env", extra="ignore")

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """``REDIS_URL``: ``redis://`` or ``rediss://`` (TLS); may carry credentials.

    ``redis+cluster://host:port[,host:port...]/0`` (``rediss+cluster://`` for TLS)
    names a Redis Cluster by one or more of its nodes; a cluster has database 0 only.
    """
    username: str | None = None
    """``REDIS_USERNAME``: ACL user, if not in the URL."""
    password: SecretStr | None = None
    """``REDIS_PASSWORD``: if not in the URL."""
    ssl_ca_certs: str | None = None
    """``REDIS_SSL_CA_CERTS``: CA bundle for ``rediss://``."""
    namespace: str = "streamrec"
    """``REDIS_NAMESPACE``: prefix of every key streamrec writes (no braces)."""
    socket_timeout: float = 5.0
    """``REDIS_SOCKET_TIMEOUT`` in seconds."""

    @field_validator("namespace")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        # Redis Cluster hashes the first {...} of a key: a brace in the prefix would
        # displace the hash tags that keep each atomic step's keys in one slot.
        if "{" in value or "}" in value:
            raise ValueError(f"REDIS_NAMESPACE must not contain braces, got {value!r}")
        return value

    def keys(self) -> KeySpace:
        return KeySpace(self.namespace)


class TopicSettings(BaseSettings):
    """Topic names and partition count (``STREAMREC_TOPIC_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_TOPIC_", env_file=".env", extra="ignore"
    )

    clicks: str = "clicks"
    """``STREAMREC_TOPIC_CLICKS``."""
    impressions: str = "impressions"
    """``STREAMREC_TOPIC_IMPRESSIONS``."""
    rewards: str = "rewards"
    """``STREAMREC_TOPIC_REWARDS``: graded reward signals (purchases, dwell, ratings)."""
    feedback: str = "feedback"
    """``STREAMREC_TOPIC_FEEDBACK``."""
    dead_letter: str = "dead-letter"
    """``STREAMREC_TOPIC_DEAD_LETTER``."""
    partitions: int = Field(DEFAULT_PARTITIONS, ge=1)
    """``STREAMREC_TOPIC_PARTITIONS``: used when streamrec creates the topics."""
    replication_factor: int = Field(3, ge=1)
    """``STREAMREC_TOPIC_REPLICATION_FACTOR``: replicas of each topic streamrec creates
    (``streamrec up``'s embedded single broker uses 1)."""
    min_insync_replicas: int = Field(2, ge=1)
    """``STREAMREC_TOPIC_MIN_INSYNC_REPLICAS``: replicas that must have a record before
    ``acks=all`` succeeds; with 3 replicas and 2, one broker can be lost without
    losing an acknowledged record (embedded: 1)."""

    def all(self) -> dict[str, int]:
        return {
            name: self.partitions
            for name in (
                self.clicks,
                self.impressions,
                self.rewards,
                self.feedback,
                self.dead_letter,
            )
        }


class RuntimeSettings(BaseSettings):
    """The consumer loop's knobs (``STREAMREC_RUNTIME_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_RUNTIME_", env_file=".env", extra="ignore"
    )

    max_batch: int = Field(5_000, ge=1)
    """``STREAMREC_RUNTIME_MAX_BATCH``: records per poll."""
    poll_timeout_ms: int = Field(100, ge=1)
    """``STREAMREC_RUNTIME_POLL_TIMEOUT_MS``."""
    checkpoint_interval_s: float = Field(1.0, gt=0)
    """``STREAMREC_RUNTIME_CHECKPOINT_INTERVAL_S``: state + offsets to Redis this often."""
    metrics_port: int = Field(0, ge=0)
    """``STREAMREC_RUNTIME_METRICS_PORT``: /metrics port; 0 picks a free one (logged)."""
    metrics_host: str = "127.0.0.1"
    """``STREAMREC_RUNTIME_METRICS_HOST``: 0.0.0.0 in containers."""
    lag_interval_s: float = Field(5.0, gt=0)
    """``STREAMREC_RUNTIME_LAG_INTERVAL_S``: how often consumer lag is measured."""
    offset_reset: Literal["pause", "earliest", "latest"] = "pause"
    """``STREAMREC_RUNTIME_OFFSET_RESET``: what to do with a partition whose checkpointed
    offset is past the end of its log (the log was truncated or the topic recreated):
    ``pause`` it until an operator acts (alert ``StreamrecOffsetsOutOfRange``),
    re-read from the ``earliest`` record (may apply records twice), or skip to the
    ``latest`` (may skip records). An offset below the log start (retention deleted
    unread records) always resumes at the log start; the records lost are counted."""
