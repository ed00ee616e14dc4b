"""The read side used in services: ``IndexReader`` searches a published index."""
