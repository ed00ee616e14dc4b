"""SQLAlchemy 2.0 models and the registry of record kinds.

Importing this package registers the built-in kinds.
"""

from afterwrite.models.base import Base
from afterwrite.models.dead_letter import DeadLetter
from afterwrite.models.embedding import Embedding, EmbeddingCache, EmbeddingJob
from afterwrite.models.erasure_log import ErasureLog
from afterwrite.models.index_build import IndexBuild
from afterwrite.models.metric import MetricPoint, MetricRollup
from afterwrite.models.query_history import QueryHistory
from afterwrite.models.registry import Kind, KindRegistry, UnknownKindError, kinds, register_kind

__all__ = [
    "Base",
    "DeadLetter",
    "Embedding",
    "EmbeddingCache",
    "EmbeddingJob",
    "ErasureLog",
    "IndexBuild",
    "Kind",
    "KindRegistry",
    "MetricPoint",
    "MetricRollup",
    "QueryHistory",
    "UnknownKindError",
    "kinds",
    "register_kind",
]
