"""The ``afterwrite`` command line: on top of everything, imported by nothing."""
