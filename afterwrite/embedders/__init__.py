"""Embedding providers: the offline default model and OpenAI-compatible endpoints.

No database here: the embedding stage (``afterwrite.worker.embedding``) uses them in the worker,
and ``IndexReader`` uses them to search by text.
"""
