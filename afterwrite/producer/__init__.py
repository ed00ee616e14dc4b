"""The afterwrite client used in request handlers: ``Client`` (sync) and ``AsyncClient``.

Light on purpose: importing it loads the core (settings, wire format, ids, kind names), redis
and msgspec, never SQLAlchemy, psycopg, Celery, numpy or FAISS. Searching lives in
``afterwrite.readers``.
"""

from afterwrite.producer.aio import AsyncClient
from afterwrite.producer.client import Client
from afterwrite.producer.records import Outcome, ProducerStats, Receipt

__all__ = ["AsyncClient", "Client", "Outcome", "ProducerStats", "Receipt"]
