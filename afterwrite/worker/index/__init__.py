"""FAISS index lifecycle: read vectors from PostgreSQL, build, publish atomically, freshen.

Modules: ``source`` (COPY BINARY → numpy), ``choose`` (index type, pure), ``build`` (FAISS,
recall), ``files`` (on-disk format, atomic writes, verified loading), ``publish`` (versions,
manifest, rollback), ``delta`` (changes since a build), ``lock`` (one builder per collection),
``jobs`` (the functions Celery wraps). Readers: ``afterwrite.readers.index_reader.IndexReader``.
"""
