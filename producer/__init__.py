"""The afterwrite client used in request handlers."""

from producer.aio import AsyncClient
from producer.client import Client
from producer.records import Outcome, ProducerStats, Receipt

__all__ = ["AsyncClient", "Client", "Outcome", "ProducerStats", "Receipt"]
