"""The index stage: read vectors from PostgreSQL, build, publish atomically, freshen.

Modules: ``source`` (COPY BINARY → numpy), ``publish`` (versions, manifest, rollback), ``delta``
(changes since a build), ``lock`` (one builder per collection, a PostgreSQL advisory lock),
``jobs`` (the functions Celery wraps). The FAISS side with no database (``choose``, ``build``,
``files``) is ``afterwrite.vectorindex``; readers: ``afterwrite.readers.index_reader``.
"""
