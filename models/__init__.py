"""SQLAlchemy 2.0 models and the registry of record kinds.

Importing this package registers the built-in kinds.
"""

from models.base import Base
from models.dead_letter import DeadLetter
from models.embedding import Embedding, EmbeddingCache, EmbeddingJob
from models.index_build import IndexBuild
from models.metric import MetricPoint, MetricRollup
from models.query_history import QueryHistory
from models.registry import Kind, KindRegistry, UnknownKindError, kinds, register_kind

__all__ = [
    "Base",
    "DeadLetter",
    "Embedding",
    "EmbeddingCache",
    "EmbeddingJob",
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
