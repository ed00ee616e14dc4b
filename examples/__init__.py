"""Example web apps that record every answered query with afterwrite (not part of the package)."""
