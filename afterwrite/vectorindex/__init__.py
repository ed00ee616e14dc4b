"""FAISS index files: the on-disk format, verified loading, building, choosing a type.

No database here: the worker's index stage (``afterwrite.worker.index``) builds and publishes
with it, and ``IndexReader`` loads what it published.
"""
