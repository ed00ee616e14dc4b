"""Ingest: stream entries → validated rows → committed batches, and the dead-letter store."""
