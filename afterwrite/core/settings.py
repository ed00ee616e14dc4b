"""One typed settings object, loaded once from ``AFTERWRITE_*`` environment variables.

Every process (request handler, worker, beat, CLI) calls :func:`load_settings` once at start and
passes the result explicitly. A wrong value, a missing required value or an unknown
``AFTERWRITE_*`` variable (usually a typo) fails with :class:`SettingsError`, whose message names
the variable, so a bad deploy stops at start instead of misbehaving later.

Units are in the names: ``_s`` seconds, ``_ms`` milliseconds.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from afterwrite.core.errors import SettingsError

ENV_PREFIX = "AFTERWRITE_"

LOCAL_MODELS = ("all-MiniLM-L6-v2-onnx-int8", "wordllama-l2-supercat-256")
"""The offline models' ids (``AFTERWRITE_LOCAL_MODEL``), the default first: the ids stored with
their vectors, so an index never mixes two of them."""

# Variables that belong to the tooling around afterwrite rather than to the settings object.
_NOT_SETTINGS = frozenset(
    {
        "AFTERWRITE_VENV",  # ./dev
        "AFTERWRITE_PG_BIN",  # afterwrite.demo.services: where to find PostgreSQL binaries
        "AFTERWRITE_REDIS_SERVER",  # afterwrite.demo.services: which redis-server to run
        "AFTERWRITE_TEST_DATABASE_URL",  # tests: server to create test databases on
        "AFTERWRITE_TEST_REDIS_URL",  # tests: Redis to use (a database number is flushed)
        "AFTERWRITE_TEST_REDIS_DB",  # tests: that database number (else chosen by pid)
        "AFTERWRITE_TEST_SERVICES",  # tests: "private" starts private servers
    }
)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Validated configuration. Field ``x`` is read from ``AFTERWRITE_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    # --- where things are -------------------------------------------------------------------
    database_url: str | None = None
    """PostgreSQL URL (``postgresql://user@host:5432/db``). Required by workers and the CLI."""
    redis_url: str | None = None
    """Redis URL for the record streams (``redis://``, ``rediss://user:pass@…``, ``unix://``)."""
    broker_url: str | None = None
    """Celery broker URL; defaults to ``redis_url``."""
    data_dir: Path = Path(".afterwrite")
    """Where the demo keeps private PostgreSQL/Redis data when no URLs are configured, and the
    default parent of the spill journal and the indexes. A relative path is taken from the
    working directory of the process reading the settings: deployments set an absolute one."""

    # --- streams ----------------------------------------------------------------------------
    stream_prefix: str = "afterwrite"
    """Redis key prefix: kind ``query`` streams to ``<prefix>:stream:query``."""
    consumer_group: str = "afterwrite"
    stream_max_entries: PositiveInt = 1_000_000
    """Backlog cap per stream. Over it, producers stop adding (and report it) rather than grow
    Redis memory without bound; entries are never trimmed before they are drained."""

    # --- producer ---------------------------------------------------------------------------
    producer_timeout_ms: PositiveFloat = 50.0
    """Socket timeout of one producer call to Redis: the most a ``record_*`` call can block."""
    redis_memory_high_water: Annotated[float, Field(gt=0, le=1)] = 0.8
    """Producers stop adding (and spill) while Redis uses more than this share of its
    ``maxmemory``, leaving the rest for the broker and consumer groups, so that the drains
    that free memory keep running. Checked with the stream cap, not per call."""
    producer_cap_check_interval_s: PositiveFloat = 1.0
    """How often a producer re-reads the stream length to enforce ``stream_max_entries``."""
    producer_mode: str = "direct"
    """``direct``: each ``record_*`` call XADDs itself (bounded by ``producer_timeout_ms``).
    ``background``: calls append to an in-process buffer (microseconds) and a flusher thread
    sends batches; a process killed with SIGKILL loses what was still buffered."""
    producer_buffer_max_entries: Annotated[int, Field(gt=0, le=10_000_000)] = 10_000
    """Background mode: entries handed in but not yet sent or spilled. A call finding the buffer
    full spills its entry to disk itself instead of waiting."""
    producer_flush_interval_ms: Annotated[float, Field(gt=0, le=60_000)] = 20.0
    """Background mode: the longest an entry waits in the buffer before its batch is sent."""
    producer_flush_max_entries: Annotated[int, Field(gt=0, le=10_000)] = 500
    """Background mode: entries per batch (one round trip per stream); also the replay chunk."""
    producer_exit_flush_timeout_s: Annotated[float, Field(ge=0, le=300)] = 2.0
    """At exit and in ``close()``: how long to try sending buffered entries before spilling
    the rest to disk."""
    spill_dir: Path | None = None
    """Spill journal directory (default ``<data_dir>/spill``). Entries Redis could not take wait
    here and are replayed when it is back, also by a later process using the same directory."""
    spill_max_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024
    """Most disk the spill journal (all processes sharing ``spill_dir``) may use. When full,
    new entries are dropped and counted; ones already spilled are kept. 0 disables spilling."""
    spill_replay_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    """How often a producer looks for spilled entries to replay (its own and other processes')."""

    @field_validator("data_dir", "spill_dir", "index_dir")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        # Pinned when the settings are read, so a process that changes directory later (a
        # daemonised worker, a test) keeps writing where it said it would, and status shows
        # where that is.
        return None if v is None else v.expanduser().absolute()

    @field_validator("producer_mode")
    @classmethod
    def _check_producer_mode(cls, v: str) -> str:
        if v not in {"direct", "background"}:
            raise ValueError("must be 'direct' or 'background'")
        return v

    @model_validator(mode="after")
    def _check_producer(self) -> Settings:
        if self.producer_flush_max_entries > self.producer_buffer_max_entries:
            raise ValueError(
                "AFTERWRITE_PRODUCER_FLUSH_MAX_ENTRIES must not exceed "
                "AFTERWRITE_PRODUCER_BUFFER_MAX_ENTRIES "
                f"({self.producer_flush_max_entries} > {self.producer_buffer_max_entries})"
            )
        if 0 < self.spill_max_bytes < 1024 * 1024:
            raise ValueError("AFTERWRITE_SPILL_MAX_BYTES must be 0 (no spilling) or at least 1 MiB")
        return self

    @property
    def spill_path(self) -> Path:
        """The spill journal directory: ``spill_dir``, else ``<data_dir>/spill``."""
        return self.spill_dir if self.spill_dir is not None else self.data_dir / "spill"

    # --- drain ------------------------------------------------------------------------------
    batch_max_entries: Annotated[int, Field(gt=0, le=100_000)] = 5_000
    """Entries read from a stream per batch (one COPY, one COMMIT)."""
    drain_interval_s: PositiveFloat = 1.0
    """Beat kicks every kind's drain this often."""
    drain_budget_s: PositiveFloat = 10.0
    """A drain that finds backlog keeps going for at most this long, then yields its worker."""
    drainers_per_stream: Annotated[int, Field(gt=0, le=64)] = 2
    """At most this many drains read one stream at the same time."""
    batch_timeout_s: PositiveFloat = 30.0
    """PostgreSQL statement timeout for one batch's writes."""
    consumer_idle_forget_s: PositiveFloat = 600.0
    """A stream consumer with nothing pending and idle this long (a stopped or replaced worker
    process) is removed by the reclaim task, so ``status`` counts live consumers."""
    reclaim_idle_s: PositiveFloat = 120.0
    """Pending entries idle this long belong to a dead consumer and are reclaimed."""
    reclaim_interval_s: PositiveFloat = 15.0
    max_deliveries: Annotated[int, Field(gt=0, le=1000)] = 5
    """An entry delivered more often than this is dead-lettered instead of retried."""
    dlq_guard_ratio: Annotated[float, Field(gt=0, le=1)] = 0.9
    """A batch in which at least this share of entries does not fit the table (unknown or
    missing fields, undecodable) is not dead-lettered: the drain stops loudly instead, because
    that means a bad deploy, not bad data. Bad content never trips it."""
    max_future_skew_s: PositiveFloat = 86_400.0
    """A ``created_at`` later than now plus this is dead-lettered (``in_the_future``): a year
    9999 would never expire."""
    dlq_guard_min_entries: PositiveInt = 100
    """The guard only judges batches of at least this many entries."""
    imports: tuple[str, ...] = ()
    """Modules to import at start that register record kinds (comma-separated)."""
    migration_dirs: tuple[Path, ...] = ()
    """Directories of an application's own Alembic revisions (for its kinds), separated by
    ``os.pathsep`` (``:``); ``afterwrite migrate`` applies them with afterwrite's."""
    dead_letter_max_payload_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 64 * 1024
    """A dead letter stores at most this many bytes of its payload (the head), with the whole
    payload's length and sha256; such an entry cannot be replayed."""
    import_max_line_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 16 << 20
    """``afterwrite import``: a longer line is dead-lettered (``line_too_long``) unread. The
    default holds any row the drain accepts (1M-character texts, 1 MB JSON columns)."""

    # --- privacy ----------------------------------------------------------------------------
    redact: dict[str, str] = Field(default_factory=dict)
    """What workers redact before anything is stored: ``kind.field=redactors`` pairs,
    e.g. ``query.query=all,query.response=email+card,embed.text=all``. Redactors: ``all``,
    ``email``, ``phone``, ``card``, ``secret``, ``ip``, ``custom`` (joined by ``+``);
    ``kind.*`` is every text or JSON field of the kind. Empty: nothing is redacted."""
    redactor: str | None = None
    """Your own redactor, ``module:function`` taking and returning a str; it runs after the
    built-ins wherever a rule names ``custom`` (or ``all``)."""
    producer_redact: bool = False
    """Producers apply the same ``AFTERWRITE_REDACT`` rules before a record reaches Redis or
    the spill journal (costs the request handler the redaction; see the README's figures)."""
    dead_letter_keep_raw: bool = False
    """Dead letters of a kind with redaction rules keep the entry's original bytes. Off: they
    keep the redacted record (still replayable), and an entry whose redaction failed keeps
    none of its content."""
    no_text_modes: tuple[str, ...] = ()
    """Query records of these modes (comma-separated) are stored without ``query`` and
    ``response`` bodies, as with ``record_query(..., store_text=False)``."""
    no_text_models: tuple[str, ...] = ()
    """Query records naming any of these models in ``model_ids`` are stored without bodies."""

    @field_validator("redact", mode="before")
    @classmethod
    def _parse_redact(cls, v: Any) -> Any:
        return _pairs(v, "kind.field=redactors, e.g. query.query=all")

    @field_validator("redactor")
    @classmethod
    def _check_redactor(cls, v: str | None) -> str | None:
        if v is None:
            return None
        module, sep, attr = v.partition(":")
        if (
            not sep
            or not all(p.isidentifier() for p in module.split("."))
            or not attr.isidentifier()
        ):
            raise ValueError(f"{v!r} must be module:function, e.g. myapp.pii:redact")
        return v

    @field_validator("no_text_modes", "no_text_models", mode="before")
    @classmethod
    def _split_names(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(m.strip() for m in v.split(",") if m.strip())
        return v

    @model_validator(mode="after")
    def _check_redact(self) -> Settings:
        from afterwrite.core.redaction import parse_rules

        try:
            parse_rules(self.redact, hook=self.redactor is not None)
        except ValueError as exc:
            raise ValueError(f"AFTERWRITE_REDACT: {exc}") from None
        return self

    def redaction_rules(self) -> dict[tuple[str, str], frozenset[str]]:
        """``AFTERWRITE_REDACT`` parsed: (kind, field) → redactor names."""
        from afterwrite.core.redaction import parse_rules

        return parse_rules(self.redact, hook=self.redactor is not None)

    # --- retention --------------------------------------------------------------------------
    retention_days: dict[str, int] = Field(default_factory=dict)
    """Per-kind retention, ``query=90,agent_task=30``; overrides a kind's own default. Kinds
    without one keep their rows forever (query history by default)."""
    retention_interval_s: PositiveFloat = 3600.0
    retention_chunk_rows: Annotated[int, Field(gt=0, le=1_000_000)] = 5_000
    """Rows deleted per transaction: short locks, small WAL bursts."""
    retention_budget_s: PositiveFloat = 60.0
    """A retention run stops after this long; the next run continues."""
    dead_letter_retention_days: Annotated[int, Field(ge=1, le=100_000)] = 30
    """Dead letters not seen again for this long are deleted, and never kept longer than
    their kind's own retention."""
    embedding_cache_retention_days: Annotated[int, Field(ge=1, le=100_000)] = 90
    """Embedding cache entries older than this that no live embedding uses are deleted."""
    index_version_retention_days: Annotated[int, Field(ge=1, le=100_000)] = 30
    """Index versions built longer ago than this are deleted (never the published one),
    whatever ``index_keep_versions`` says: a rollback cannot bring back older data."""
    erasure_log_retention_days: Annotated[int, Field(ge=1, le=100_000)] = 1095
    """Erasure log rows (user hash and counts) are kept this long (3 years): the evidence
    that a request was carried out."""
    erasure_tombstone_days: Annotated[int, Field(ge=1, le=100_000)] = 30
    """An erasure's tombstone (drains drop the user's entries recorded before it) is kept
    this long: spill journals on other hosts must be replayed or cleaned within it."""

    # --- embeddings -------------------------------------------------------------------------
    embedding_provider: str = "auto"
    """``local`` (the bundled offline model), ``openai`` (OpenAI or any compatible endpoint at
    ``OPENAI_BASE_URL``), or ``auto``: ``openai`` when an API key is set, else ``local``."""
    local_model: str = "all-MiniLM-L6-v2-onnx-int8"
    """The offline model the ``local`` provider uses: ``all-MiniLM-L6-v2-onnx-int8`` (384
    dimensions, the better retrieval) or ``wordllama-l2-supercat-256`` (256 dimensions, static
    token vectors: hundreds of times faster, weaker on retrieval)."""
    embedding_model: str | None = None
    """Model id; default ``text-embedding-3-small`` (openai) or ``local_model`` (local)."""
    embedding_dimensions: Annotated[int, Field(gt=0, le=65_536)] | None = None
    """OpenAI ``dimensions`` parameter (shortened vectors); unset: the model's own."""
    embedding_collection_models: dict[str, str] = Field(default_factory=dict)
    """Per-collection model, ``docs=text-embedding-3-large,faq=…``; others use the default.
    Changing a collection's model takes ``afterwrite embeddings reembed COLLECTION``."""
    openai_api_key: SecretStr | None = None
    """Also read from ``OPENAI_API_KEY``."""
    openai_base_url: str | None = None
    """Also read from ``OPENAI_BASE_URL``: Azure, Ollama, vLLM, TEI, LM Studio, …"""
    embedding_max_inputs: Annotated[int, Field(gt=0, le=100_000)] = 2048
    """Inputs per provider request (OpenAI: 2,048)."""
    embedding_max_input_tokens: Annotated[int, Field(gt=0, le=1_000_000)] = 8192
    """Tokens per input (OpenAI: 8,192). The local model reads at most 256 word pieces."""
    embedding_max_request_tokens: Annotated[int, Field(gt=0, le=10_000_000)] = 300_000
    """Tokens per request, all inputs together (OpenAI: 300,000)."""
    embedding_overlong: str = "truncate"
    """An input over ``embedding_max_input_tokens``: ``truncate`` it to the limit, or
    ``dead_letter`` its job. Never a failed request."""
    embedding_concurrency: Annotated[int, Field(gt=0, le=64)] = 4
    """Provider requests in flight at once per worker process (halved on each 429)."""
    embedding_timeout_s: PositiveFloat = 30.0
    """Timeout of one provider request."""
    embedding_max_retries: Annotated[int, Field(ge=0, le=100)] = 6
    """Retries of a request after 429, 5xx, timeouts and connection errors (honouring
    ``Retry-After``); after the last one the batch is retried by a later run, nothing lost."""
    embedding_batch_jobs: Annotated[int, Field(gt=0, le=100_000)] = 2048
    """Embedding jobs taken per batch (one transaction)."""
    embedding_interval_s: PositiveFloat = 1.0
    """Beat kicks the embedding stage this often."""
    embedding_workers: Annotated[int, Field(gt=0, le=64)] = 1
    """Embedding batches running at once across all workers: the rest of the pool stays free
    for drains however slow the provider is."""
    embed_queries: bool = False
    """The drain of the ``query`` kind also enqueues each stored query's text as an embedding
    job of the ``queries`` collection (doc id: the event id), so ``History.similar`` can find
    earlier questions like a new one. Read by workers; ``record_query(..., embed=True)`` asks
    for it per record instead."""
    search_responses: bool = False
    """The drain of the ``query`` kind also indexes each response's words for
    ``History.search_text`` (queries' words always are). Off by default: parsing a ~1,300
    character answer costs PostgreSQL ~300 µs of CPU per row, several times the rest of the
    insert. Read by workers (and ``afterwrite import``); ``afterwrite history index-responses``
    indexes the rows stored before it was turned on."""

    # --- indexes ----------------------------------------------------------------------------
    index_dir: Path | None = None
    """FAISS index directory, one sub-directory per collection (default ``<data_dir>/indexes``).
    Readers in other processes point ``IndexReader`` at the same directory."""
    index_rebuild_interval_s: PositiveFloat = 60.0
    """Beat checks each collection this often and rebuilds it when it changed."""
    index_refresh_interval_s: PositiveFloat = 2.0
    """How often vectors committed since the last build are published for readers (freshness)."""
    index_keep_versions: Annotated[int, Field(ge=1, le=1000)] = 3
    """Published versions kept per collection (for rollback)."""
    index_factory: dict[str, str] = Field(default_factory=dict)
    """Per-collection FAISS factory string override, ``docs=IVF1024,Flat``; others are chosen
    by size."""
    index_exact_max_vectors: PositiveInt = 50_000
    """Collections up to this size get exact search; larger ones IVF."""
    index_memory_budget_mb: PositiveInt = 4096
    """Memory a built index may take; chooses a compressed index when flat vectors exceed it."""
    index_recall_floor: Annotated[float, Field(ge=0, le=1)] = 0.9
    """A build whose recall@10 against exact search (on a sample) is below this is not
    published."""
    index_text_max_bytes: Annotated[int, Field(ge=0, le=1_000_000)] = 2048
    """Text kept per document in an index version (UTF-8, cut at a character boundary), what
    ``IndexReader.search`` returns; 0 keeps none."""
    index_metadata_max_bytes: Annotated[int, Field(ge=0, le=1_000_000)] = 1024
    """Metadata kept per document in an index version (compact JSON); larger metadata keeps
    its filterable keys that fit. Filtering always sees every filterable key."""

    # --- flower -----------------------------------------------------------------------------
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    flower_port: Annotated[int, Field(gt=0, lt=65536)] = 5555
    flower_address: str = "127.0.0.1"
    """Address Flower listens on (``--address``): this machine only unless told otherwise
    (``0.0.0.0`` in a container whose port is published)."""
    flower_unauthenticated: bool = False
    """Explicit opt-out of Flower authentication (local development only)."""

    # --- metrics endpoints ------------------------------------------------------------------
    metrics_user: str | None = None
    """HTTP basic login of ``afterwrite metrics-server`` and an application's ``/metrics``
    (the example app's): what Prometheus's scrape config holds. Never Flower's login, which
    can shut workers down."""
    metrics_password: SecretStr | None = None
    metrics_unauthenticated: bool = False
    """Explicit opt-out of the metrics endpoints' authentication (local development only)."""

    # --- logging ----------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        scheme = urlsplit(v).scheme
        if scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
            raise ValueError(f"must be a postgresql:// URL, got scheme {scheme!r}")
        return v

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {parts.scheme!r}")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host")
        return v

    @field_validator("embedding_provider")
    @classmethod
    def _check_provider(cls, v: str) -> str:
        if v not in {"auto", "local", "openai"}:
            raise ValueError("must be 'auto', 'local' or 'openai'")
        return v

    @field_validator("local_model")
    @classmethod
    def _check_local_model(cls, v: str) -> str:
        if v not in LOCAL_MODELS:
            raise ValueError(f"must be one of {', '.join(LOCAL_MODELS)}")
        return v

    @field_validator("embedding_overlong")
    @classmethod
    def _check_overlong(cls, v: str) -> str:
        if v not in {"truncate", "dead_letter"}:
            raise ValueError("must be 'truncate' or 'dead_letter'")
        return v

    @field_validator("embedding_collection_models", "index_factory", mode="before")
    @classmethod
    def _parse_mapping(cls, v: Any) -> Any:
        return _pairs(v, "collection=value")

    @field_validator("retention_days", mode="before")
    @classmethod
    def _parse_retention(cls, v: Any) -> Any:
        return _pairs(v, "kind=days, e.g. query=90")

    @field_validator("retention_days")
    @classmethod
    def _check_retention(cls, v: dict[str, int]) -> dict[str, int]:
        for kind, days in v.items():
            if days < 1:
                raise ValueError(f"{kind}: retention must be at least 1 day, got {days}")
        return v

    @field_validator("migration_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(Path(p) for p in v.split(os.pathsep) if p.strip())
        return v

    @field_validator("migration_dirs")
    @classmethod
    def _check_dirs(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        for d in v:
            if not d.is_dir():
                raise ValueError(f"{d} is not a directory")
        return v

    @field_validator("imports", mode="before")
    @classmethod
    def _split_imports(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(m.strip() for m in v.split(",") if m.strip())
        return v

    @field_validator("imports")
    @classmethod
    def _check_imports(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for module in v:
            if not all(part.isidentifier() for part in module.split(".")):
                raise ValueError(f"{module!r} is not a module name")
        return v

    @field_validator("stream_prefix", "consumer_group")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "_-." for c in v):
            raise ValueError("may contain only letters, digits, '_', '-' and '.'")
        return v

    @field_validator("flower_address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        # Flower reads an empty address as "every interface": that must be said as 0.0.0.0.
        if not v or any(c.isspace() for c in v):
            raise ValueError("must be an address or host name, e.g. 127.0.0.1 or 0.0.0.0")
        return v

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, v: str) -> str:
        level = v.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @model_validator(mode="after")
    def _check_timing(self) -> Settings:
        # A batch must finish (or be abandoned by its statement timeout) well before another
        # worker may take its entries over, or the same entries are written by two workers at once.
        if self.reclaim_idle_s < 2 * self.batch_timeout_s:
            raise ValueError(
                "AFTERWRITE_RECLAIM_IDLE_S must be at least twice AFTERWRITE_BATCH_TIMEOUT_S "
                f"({self.reclaim_idle_s} < 2 x {self.batch_timeout_s})"
            )
        if self.flower_password is not None and not self.flower_user:
            raise ValueError("AFTERWRITE_FLOWER_PASSWORD is set but AFTERWRITE_FLOWER_USER is not")
        if self.metrics_password is not None and not self.metrics_user:
            raise ValueError(
                "AFTERWRITE_METRICS_PASSWORD is set but AFTERWRITE_METRICS_USER is not"
            )
        if (
            self.metrics_password is not None
            and self.flower_password is not None
            and self.metrics_password.get_secret_value() == self.flower_password.get_secret_value()
        ):
            # whoever reads the scrape config must not get the login that shuts workers down
            raise ValueError(
                "AFTERWRITE_METRICS_PASSWORD must differ from AFTERWRITE_FLOWER_PASSWORD "
                "(the scrape login must not open Flower)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: Any, *_: Any, **__: Any
    ) -> tuple[Any, ...]:
        # load_settings() hands every value in explicitly, so an explicit ``environ`` fully
        # decides the result; pydantic-settings reading os.environ itself would bypass it.
        return (init_settings,)

    # --- derived ----------------------------------------------------------------------------
    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.require_redis_url()

    def require_database_url(self) -> str:
        """The database URL as libpq/psycopg takes it; SettingsError when unset."""
        if not self.database_url:
            raise SettingsError(f"{ENV_PREFIX}DATABASE_URL is not set (a postgresql:// URL)")
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    @property
    def index_path(self) -> Path:
        """The index directory: ``index_dir``, else ``<data_dir>/indexes``."""
        return self.index_dir if self.index_dir is not None else self.data_dir / "indexes"

    @property
    def resolved_embedding_provider(self) -> str:
        """``local`` or ``openai`` (``auto`` resolved by whether an API key is set)."""
        if self.embedding_provider != "auto":
            return self.embedding_provider
        return "openai" if self.openai_api_key is not None else "local"

    def collection_model(self, collection: str) -> str:
        """The embedding model configured for ``collection``."""
        model = self.embedding_collection_models.get(collection)
        if model:
            return model
        if self.embedding_model:
            return self.embedding_model
        if self.resolved_embedding_provider == "openai":
            return "text-embedding-3-small"
        return self.local_model

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise SettingsError(f"{ENV_PREFIX}REDIS_URL is not set (a redis:// URL)")
        return self.redis_url

    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 driver named, for SQLAlchemy and Alembic."""
        url = self.require_database_url()
        return "postgresql+psycopg://" + url.split("://", 1)[1]


def _pairs(v: Any, expected: str) -> Any:
    """``a=1,b=2`` → ``{"a": "1", "b": "2"}``; anything else is left to pydantic."""
    if not isinstance(v, str):
        return v
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in v.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected {expected}")
        out[key.strip()] = value.strip()
    return out


# The OpenAI client's own variables, read when the AFTERWRITE_ ones are not set.
_FALLBACK_ENV = {"openai_api_key": "OPENAI_API_KEY", "openai_base_url": "OPENAI_BASE_URL"}


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    known = {_env_name(f) for f in Settings.model_fields} | _NOT_SETTINGS
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read and validate settings from ``environ`` (default: ``os.environ``).

    ``overrides`` (field names) win over the environment; tests and the demo use them.
    Raises SettingsError naming each offending variable.
    """
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    for name in _unknown_variables(env):
        close = difflib.get_close_matches(name, [_env_name(f) for f in Settings.model_fields], 1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{name}: unknown setting{hint}")

    values: dict[str, Any] = {
        f: env[_env_name(f)] for f in Settings.model_fields if _env_name(f) in env
    }
    for field, name in _FALLBACK_ENV.items():
        if field not in values and env.get(name):
            values[field] = env[name]
    values.update(overrides)
    settings: Settings | None = None
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:
                problems.append(msg)
                continue
            field, *inner = (str(p) for p in err["loc"])
            where = f" ({'.'.join(inner)})" if inner else ""
            problems.append(f"{_env_name(field)}{where}: {msg}")
    if problems:
        raise SettingsError("invalid afterwrite settings:\n  " + "\n  ".join(problems))
    assert settings is not None
    return settings
