"""A record kind of your own, end to end: an agent task/step log.

What an agent platform keeps per step: which agent, which task, the step number, its status,
how long it took, what it cost in tokens and dollars, and the error if it failed. This package
is exactly what a team writes (see README, "Your own record kinds"):

- ``model.py``: a SQLAlchemy model registered as kind ``agent_step``, with a validator;
- ``migrations/``: its Alembic revision, on a branch of its own;
- ``AFTERWRITE_IMPORTS=examples.agent_steps.model`` and
  ``AFTERWRITE_MIGRATION_DIRS=examples/agent_steps/migrations`` to plug it in.
"""
