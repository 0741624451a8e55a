"""Transports move encoded messages; they never know which strategy runs."""

from fedsilo.sdk.transport.amqp import (
    AmqpTransport,
    BrokerUnavailable,
    PublishError,
    TransferProgress,
)
from fedsilo.sdk.transport.base import Delivery, TrafficCounter, Transport
from fedsilo.sdk.transport.memory import MemoryTransport

__all__ = [
    "AmqpTransport",
    "BrokerUnavailable",
    "Delivery",
    "MemoryTransport",
    "PublishError",
    "TrafficCounter",
    "TransferProgress",
    "Transport",
]
