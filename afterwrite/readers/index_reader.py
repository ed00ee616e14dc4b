"""``IndexReader``: search a collection's published FAISS index from a service.

The reader holds one immutable *view* (a verified index version, its doc map, and the freshness
delta for that version) behind one reference. Every search reads that reference once, so an
answer always comes from exactly one version. At most every ``check_interval_s`` a search stats
``manifest.json`` and the served version's ``.delta`` (two ``stat`` calls: cheap); when either
changed, a background thread loads the new version off to the side, verifies it (sha256 of the
exact bytes deserialised, dimension, vector count, model, metric, then one probe search) and
swaps the reference. A delta is served only when the manifest names its sha256. A version or
delta that fails verification is logged once and skipped; the old view keeps serving. Nothing
blocks searches except the very first load.

Safe under many threads (FAISS searches release the GIL and never mutate the index; the
per-view search parameters are read-only) and in many processes reading one directory
(files are only ever replaced atomically; a fork child starts its own loader).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afterwrite.core.collections import check_collection
from afterwrite.core.errors import TransientError
from afterwrite.readers.hits import Hit

if TYPE_CHECKING:
    import faiss
    import numpy as np
    import numpy.typing as npt

    from afterwrite.core.settings import Settings
    from afterwrite.readers import searching
    from afterwrite.vectorindex import documents, files

log = logging.getLogger("afterwrite.index")

_StatKey = tuple[int, int, int]

QUERY_EMBED_TIMEOUT_S = 5.0
"""Provider timeout when a text query is embedded (no retries)."""


def _import_numpy_and_faiss() -> None:
    """Bind numpy, FAISS and the index file format in this module, on the first construction.

    ``from afterwrite import IndexReader`` alone loads neither (a web process that records and
    never searches pays nothing); the first ``IndexReader(...)`` does.
    """
    global faiss, np, documents, files, searching  # noqa: PLW0603  (module-level names, bound once)
    import faiss
    import numpy as np

    from afterwrite.readers import searching
    from afterwrite.vectorindex import documents, files


class IndexUnavailable(TransientError, LookupError):
    """No verified version of the collection's index has been loaded (nothing published yet,
    or every published version failed verification)."""


@dataclass(frozen=True)
class _View:
    loaded: files.Loaded
    manifest_key: _StatKey | None
    delta: files.Delta | None
    delta_key: _StatKey | None
    params: Any
    """FAISS search parameters masking the delta's ids (None: nothing masked)."""
    keep_alive: tuple[Any, ...] = ()
    """SWIG objects the parameters point to (they hold raw pointers)."""
    delta_postings: dict[bytes, Any] | None = None
    """The delta's filter postings (``documents.delta_postings``)."""

    @property
    def version(self) -> int:
        return self.loaded.version


def _stat(path: Path) -> _StatKey | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _search_params(
    index: faiss.Index, masked: npt.NDArray[np.int64]
) -> tuple[Any, tuple[Any, ...]]:
    if masked.size == 0:
        return None, ()
    fx: Any = faiss  # the stubs lack the SearchParameters keyword constructors
    batch = faiss.IDSelectorBatch(np.ascontiguousarray(masked, dtype=np.int64))
    selector = faiss.IDSelectorNot(batch)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        params = fx.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
        return params, (batch, selector)
    inner = index.index if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) else index
    hnsw = getattr(faiss.downcast_index(inner), "hnsw", None)
    if hnsw is not None:
        params = fx.SearchParametersHNSW(sel=selector, efSearch=int(hnsw.efSearch))
    else:
        params = fx.SearchParameters(sel=selector)
    return params, (batch, selector)


class IndexReader:
    """Searches ``collection``'s index in ``index_dir`` (default: ``settings.index_path``).

    ``search`` never sees a partial or unverified index; it raises :class:`IndexUnavailable`
    only while no version could be loaded at all, and ValueError for a vector of the wrong
    dimension."""

    def __init__(
        self,
        collection: str,
        index_dir: str | Path | None = None,
        *,
        settings: Settings | None = None,
        check_interval_s: float = 1.0,
    ) -> None:
        self.collection = check_collection(collection)
        _import_numpy_and_faiss()
        if index_dir is None:
            if settings is None:
                from afterwrite.core.settings import load_settings

                settings = load_settings()
            index_dir = settings.index_path
        self._settings = settings
        self._dir = Path(index_dir) / self.collection
        self.check_interval_s = check_interval_s
        self._view: _View | None = None
        self._bad_manifests: set[_StatKey] = set()
        self._bad_deltas: set[tuple[_StatKey, Any]] = set()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._next_check = 0.0
        self.loads = 0
        """Versions loaded so far (for tests and metrics)."""
        self.reload()

    # --- public -------------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        view = self._view
        return None if view is None else view.version

    @property
    def manifest(self) -> dict[str, Any] | None:
        view = self._view
        return None if view is None else dict(view.loaded.manifest)

    def reload(self) -> bool:
        """Check for a new version or delta now and load it in this thread. True when the
        served view changed."""
        self._after_fork()
        with self._lock:
            return self._check()

    @property
    def filter_keys(self) -> dict[str, int]:
        """Metadata keys ``where`` can filter on in the served version, with how many of its
        documents have each (empty for a version built without documents)."""
        view = self._view
        docs = None if view is None else view.loaded.documents
        return {} if docs is None else dict(docs.filter_keys)

    def search(self, vector_or_text: Any, k: int = 10, *, where: Any = None) -> list[Hit]:
        """The ``k`` nearest documents, best first, as :class:`Hit` (``doc_id``, ``score``:
        cosine similarity, ``text``, ``metadata``; a hit unpacks as ``(doc_id, score)``).
        Text is embedded with the model the served index was built with.

        ``where`` keeps documents whose metadata has every key equal to its value, or to one
        of its values when a list is given: ``{"lang": ["en", "de"], "source": "wiki"}``
        (strings, integers, booleans, on top-level keys). The answer is the true top ``k`` of
        the matching documents (fewer only when fewer match). A bad ``where`` raises
        ValueError before anything is searched."""
        conditions = documents.check_where(where)
        self._maybe_check()
        view = self._view
        if view is None:
            raise IndexUnavailable(f"no verified index of {self.collection!r} in {self._dir}")
        if k <= 0:
            return []
        stored = view.loaded.documents
        if conditions is not None and stored is None:
            raise IndexUnavailable(
                f"{self.collection!r} v{view.version} was built before metadata filters: a"
                " rebuild (`afterwrite index rebuild --force`) makes it filterable"
            )
        query = self._query(vector_or_text, view)
        masked = view.delta.masked if view.delta is not None else np.empty(0, dtype=np.int64)
        hits = searching.search_version(
            view.loaded, masked, view.params, query, k, conditions
        ) + searching.search_delta(view.delta, view.delta_postings, query, k, conditions)
        hits.sort(key=lambda h: -h.score)
        return hits[:k]

    # --- loading ------------------------------------------------------------------------------
    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # a fork child: the parent's lock or thread is not ours
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._loader = None

    def _maybe_check(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._after_fork()
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking or loading
        try:
            self._next_check = now + self.check_interval_s
            view = self._view
            if view is None:
                self._check()  # nothing to serve meanwhile: load in this thread
                return
            if (
                _stat(self._dir / files.MANIFEST) == view.manifest_key
                and _stat(self._dir / files.delta_file(view.version)) == view.delta_key
            ):
                return
            loader = threading.Thread(target=self._load_in_background, daemon=True)
            self._loader = loader
        finally:
            self._lock.release()
        loader.start()

    def _load_in_background(self) -> None:
        with self._lock:
            try:
                self._check()
            except Exception:  # any failure: this thread must end quietly, the old view serves
                log.exception(
                    "index %s: reload failed; still serving v%s",
                    self.collection,
                    self.version,
                    extra={"action": "index_reload_failed", "collection": self.collection},
                )

    def _check(self) -> bool:
        """Load what changed (caller holds ``_lock``); swap the view; True if it changed."""
        view = self._view
        loaded = view.loaded if view else None
        manifest_key = _stat(self._dir / files.MANIFEST)
        manifest_moved = view is None or manifest_key != view.manifest_key
        changed_main = False
        if manifest_key is not None and manifest_moved:
            new = self._load_main(manifest_key, loaded)
            if new is not None and new is not loaded:
                # the same version re-published with another delta bound keeps its index
                changed_main = loaded is None or new.index is not loaded.index
                loaded = new
        if loaded is None:
            return False
        delta_key = _stat(self._dir / files.delta_file(loaded.version))
        if (
            view is not None
            and not changed_main
            and delta_key == view.delta_key
            and loaded.manifest.get("delta_sha256") == view.loaded.manifest.get("delta_sha256")
        ):
            if manifest_moved:  # a bad version skipped, or the same manifest re-written
                self._view = dataclasses.replace(view, loaded=loaded, manifest_key=manifest_key)
            return False
        delta = self._load_delta(delta_key, loaded, view if not changed_main else None)
        masked = delta.masked if delta is not None else np.empty(0, dtype=np.int64)
        params, keep = _search_params(loaded.index, masked)
        postings = documents.delta_postings(delta.documents) if delta is not None else None
        self._view = _View(loaded, manifest_key, delta, delta_key, params, keep, postings)
        if changed_main:
            self.loads += 1
            log.info(
                "index %s: serving v%d",
                self.collection,
                loaded.version,
                extra={"action": "index_swapped", "collection": self.collection},
            )
        return True

    def _load_main(self, key: _StatKey, current: files.Loaded | None) -> files.Loaded | None:
        if key in self._bad_manifests:
            return current
        try:
            manifest = files.read_manifest(self._dir)
            if manifest is None:
                return current
            if (
                current is not None
                and manifest.get("version") == current.version
                and manifest.get("sha256") == current.manifest.get("sha256")
            ):
                if manifest == current.manifest:
                    return current
                return dataclasses.replace(current, manifest=manifest)  # a new delta bound
            # verified (checksums, shape, a probe search) before it can be swapped in
            return files.load_version(self._dir, manifest, collection=self.collection)
        except (files.IndexFileError, OSError, MemoryError) as exc:
            self._bad_manifests.add(key)
            log.error(
                "index %s: rejected the published version (%s); still serving v%s",
                self.collection,
                exc,
                None if current is None else current.version,
                extra={"action": "index_rejected_version", "collection": self.collection},
            )
            return current

    def _load_delta(
        self, key: _StatKey | None, loaded: files.Loaded, previous: _View | None
    ) -> files.Delta | None:
        kept = previous.delta if previous is not None else None
        if key is None:
            return None
        bad = (key, loaded.manifest.get("delta_sha256"))
        if bad in self._bad_deltas:
            return kept
        try:
            raw = (self._dir / files.delta_file(loaded.version)).read_bytes()
            try:
                delta = files.bound_delta(raw, loaded.manifest)
            except files.IndexFileError:
                # the delta may have been replaced since the manifest was read, its binding
                # not written yet: the manifest as it is now decides
                again = files.read_manifest(self._dir) or {}
                if again.get("version") != loaded.version or again.get("sha256") != (
                    loaded.manifest.get("sha256")
                ):
                    raise
                delta = files.bound_delta(raw, again)
        except FileNotFoundError:
            return None
        except (files.IndexFileError, OSError, ValueError) as exc:
            self._bad_deltas.add(bad)
            log.error(
                "index %s: rejected the delta (%s)",
                self.collection,
                exc,
                extra={"action": "index_rejected_delta", "collection": self.collection},
            )
            return kept
        if delta is None:
            return None  # the manifest binds no delta (none published yet, or a rollback)
        m = loaded.manifest
        if delta.base_version != loaded.version:
            return None  # written for another version (a newer build's delta comes next)
        if delta.dim != int(m["dim"]) or delta.model != m["model"]:
            self._bad_deltas.add(bad)
            return kept
        return delta

    # --- queries ------------------------------------------------------------------------------
    def _query(self, vector_or_text: Any, view: _View) -> npt.NDArray[np.float32]:
        dim = int(view.loaded.manifest["dim"])
        if isinstance(vector_or_text, str):
            vector: Any = self._embed(vector_or_text, str(view.loaded.manifest["model"]))
        else:
            vector = vector_or_text
        q = np.array(vector, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != dim:
            raise ValueError(f"query has dimension {q.shape[1]}, the index {dim}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm):
            raise ValueError("query vector is not finite")
        if norm > 0:
            q /= norm
        return q

    def _embed(self, text: str, model: str) -> Any:
        from afterwrite.embedders.providers import make_embedder

        settings = self._settings
        if settings is None:
            from afterwrite.core.settings import load_settings

            settings = self._settings = load_settings()
        # A search serves a request: a short provider timeout and one retry, not the
        # worker's patience (minutes of retries would hang the caller's handler).
        from afterwrite.core.settings import LOCAL_MODELS
        from afterwrite.embedders.text import normalise

        view = self._view
        update: dict[str, Any] = {
            "embedding_timeout_s": min(settings.embedding_timeout_s, QUERY_EMBED_TIMEOUT_S),
            # no retries: a 429's Retry-After could hold the caller's request for a minute
            "embedding_max_retries": 0,
        }
        if view is not None and model not in LOCAL_MODELS and settings.embedding_dimensions:
            update["embedding_dimensions"] = int(view.loaded.manifest["dim"])  # as built
        quick = settings.model_copy(update=update)
        # embedded exactly as stored documents are
        result = make_embedder(quick, model).embed_many([normalise(text)])
        if 0 not in result.vectors:
            code, detail = result.failed.get(0, ("failed", "no vector"))
            raise ValueError(f"cannot embed the query: {code}: {detail}")
        return result.vectors[0]

    def close(self) -> None:
        """Wait for a background load in progress (optional; readers hold no OS resources)."""
        loader = self._loader
        if loader is not None:
            with contextlib.suppress(RuntimeError):
                loader.join(timeout=30)
