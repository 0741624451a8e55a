"""Transports move encoded messages; they never know which strategy runs.

The names below are imported on first use, so `fedsilo.sdk.transport.settings` (read by
every config) loads without pika and torch; only the AMQP modules import pika.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.sdk.lazy import lazy_names

if TYPE_CHECKING:
    from fedsilo.sdk.transport.amqp import AmqpTransport, PublishError, TransferProgress
    from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable
    from fedsilo.sdk.transport.base import Delivery, TrafficCounter, Transport
    from fedsilo.sdk.transport.memory import MemoryTransport

_LAZY = {
    "AmqpTransport": "fedsilo.sdk.transport.amqp",
    "BrokerUnavailable": "fedsilo.sdk.transport.amqp_connection",
    "Delivery": "fedsilo.sdk.transport.base",
    "MemoryTransport": "fedsilo.sdk.transport.memory",
    "PublishError": "fedsilo.sdk.transport.amqp",
    "TrafficCounter": "fedsilo.sdk.transport.base",
    "TransferProgress": "fedsilo.sdk.transport.amqp",
    "Transport": "fedsilo.sdk.transport.base",
}

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


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
