"""The core every side shares: settings, the wire format, ids, kinds, errors, logs.

Imports nothing heavy (no SQLAlchemy, psycopg, Celery, numpy or FAISS), so a web process that
only records loads the core and the producer.
"""
