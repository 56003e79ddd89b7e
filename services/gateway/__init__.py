"""The HTTP gateway (clicks and impressions in, Kafka out) and the producer SDK."""

from __future__ import annotations

from services.gateway.app import GatewaySettings, check_auth, create_app
from services.gateway.sdk import EventProducer

__all__ = ["EventProducer", "GatewaySettings", "check_auth", "create_app"]
