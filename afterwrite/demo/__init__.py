"""``afterwrite demo``: the pipeline on realistic traffic, on whatever this machine has.

Also what the demo needs to run anywhere: private PostgreSQL and Redis when none is configured
(``services``), the worker and beat as subprocesses (``processes``), and realistic traffic.
"""
