"""Cheaper storage of a stream of values into a local Aim run (writer side only).

`FastTrack` writes values the way Aim's `run.track()` would, minus the per-value work that is
the same for every value of a sequence; `group_commit` merges the RocksDB writes of a batch of
records into one write per container. Both rely on Aim 3.x internals and fall back to Aim's own
path when those are not there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

log = logging.getLogger("aim_llama")


def context_key(context: dict[str, Any] | None) -> Any:
    """A hashable key for a context dict (flat contexts of scalars; JSON for anything else)."""
    if not context:
        return ()
    try:
        key = tuple(sorted(context.items()))
        hash(key)
        return key
    except TypeError:
        return _ctx_key(context)


_BLOB_SENTINEL = b""  # what Aim stores at a key whose value lives in the blob domain
_BLOB_DOMAIN = b"BLOBS\xfe"


class FastTrack:
    """`run.track()` for a local repo, about twice as cheap for a stream of values.

    Aim's `RunTracker._track` rebuilds (deep-copies and hashes) the context, reads the clock
    through pytz, and rewrites a sequence's `last` / `last_step` (and `min` / `max`) keys for
    every value. Here contexts are built once per distinct context, the first value of a
    sequence and anything unusual (a new dtype, a list) take Aim's own path, and the summary
    keys are written once per batch (`flush`), in the same group commit as the values. It uses
    `RunTracker` internals of Aim 3.x and is only enabled when they are all present.
    """

    def __init__(self, run: Any) -> None:
        from aim.sdk.utils import get_object_typename
        from aim.storage.context import Context

        self.run = run
        self.tracker = run._tracker
        self._context: Any = Context
        self._typename: Any = get_object_typename
        from aim.storage import encoding, treeutils

        self._encode_path: Any = getattr(encoding, "encode_path")  # noqa: B009 (Cython, untyped)
        self._encode_tree: Any = treeutils.encode_tree
        from aim.storage import rockscontainer
        from aim.storage.types import BLOB

        self._blob: Any = BLOB
        # Aim's own markers; checked here so a different Aim falls back to `run.track()`
        if (rockscontainer.BLOB_SENTINEL, rockscontainer.BLOB_DOMAIN) != (_BLOB_SENTINEL,
                                                                         _BLOB_DOMAIN):
            raise RuntimeError("unexpected Aim blob layout")
        self._contexts: dict[Any, Any] = {}
        self._dirty: dict[tuple[int, str], tuple[Any, Any, int]] = {}
        # seq_info → (RocksDB container, key prefixes of its val / epoch / time / step arrays)
        self._keys: dict[int, tuple[Any, tuple[bytes | None, ...]] | None] = {}
        for attr in ("sequence_infos", "_track", "_add_value", "meta_run_tree"):
            getattr(self.tracker, attr)

    @classmethod
    def create(cls, run: Any) -> FastTrack | None:
        """A fast tracker for `run`, or None when this Aim lacks the internals it relies on."""
        try:
            return cls(run)
        except Exception as exc:
            log.debug("aim-llama: fast tracking unavailable (%s); using run.track()", exc)
            return None

    def track(self, value: Any, name: str, step: int, context: dict[str, Any],
              ctx_key: Any) -> None:
        """Store `value` at `step` of sequence (name, context)."""
        tracker = self.tracker
        now = time.time()
        ctx = self._contexts.get(ctx_key)
        if ctx is None:
            ctx = self._contexts[ctx_key] = self._context(context)
        seq_info = tracker.sequence_infos[ctx.idx, name]
        if (not seq_info.initialized or seq_info.count == 0 or isinstance(value, (list, tuple))
                or self._typename(value) != seq_info.dtype):
            self._flush_one((ctx.idx, name))
            tracker._track(value, now, name, step, None, context=context)  # Aim's own path
            return
        fresh = step >= seq_info.count  # nothing stored at this step yet
        if fresh:
            seq_info.count = step + 1
            self._dirty[(ctx.idx, name)] = (seq_info, value, step)
        elif seq_info.version == 2 and (value > seq_info.max or value < seq_info.min):
            self._dirty.setdefault((ctx.idx, name), (seq_info, None, -1))
        if seq_info.version == 2:
            if value > seq_info.max:
                seq_info.max = value
            if value < seq_info.min:
                seq_info.min = value
        if not self._put_value(seq_info, value, step, now, fresh):
            tracker._add_value(seq_info, value, step, None, now)

    def _put_value(self, seq_info: Any, value: Any, step: int, now: float, fresh: bool) -> bool:
        """`RunTracker._add_value` as direct puts into the group-commit batch.

        Aim's tree views write each of a value's four keys (value, epoch, time, step) with a
        range delete, a put and a blob delete, through several Python layers: ~10 us a key,
        and every delete leaves a tombstone that RocksDB's compactions must carry. A `fresh`
        step has nothing to delete, so the same keys and bytes (Aim's own encoders; a BLOB as
        Aim stores it: an empty marker plus the bytes under Aim's blob prefix) are put straight
        into the batch. A rewritten step goes through `RocksContainer.set`, deletes included.
        Only inside the writer's group commit, and only for views that are plain prefixes of
        one container.
        """
        if _group.batches is None:
            return False
        seq_id = id(seq_info)
        if seq_id in self._keys:
            keys = self._keys[seq_id]
        else:
            keys = self._keys[seq_id] = self._resolve(seq_info)
        if keys is None:
            return False
        container, (val_key, epoch_key, time_key, step_key) = keys
        batch = container.batch()
        step_path = self._encode_path((seq_info.step_hash_fn(step),))
        put = batch.put
        blob_type = self._blob
        for prefix, item in ((val_key, value), (epoch_key, None), (time_key, now),
                             (step_key, step)):
            if prefix is None:
                continue
            for sub, encoded in self._encode_tree(item):
                key = prefix + step_path + sub
                if not fresh:
                    container.set(key, encoded, store_batch=batch)
                elif isinstance(encoded, blob_type):
                    put(key, _BLOB_SENTINEL)
                    put(_BLOB_DOMAIN + key, bytes(encoded))
                else:
                    put(key, encoded)
        return True

    def _resolve(self, seq_info: Any) -> tuple[Any, tuple[bytes | None, ...]] | None:
        """The container and key prefixes behind a sequence's array views, if plain."""
        from aim.storage.prefixview import PrefixView
        from aim.storage.rockscontainer import RocksContainer

        container = None
        prefixes: list[bytes | None] = []
        for name in ("val_view", "epoch_view", "time_view", "step_view"):
            view = getattr(seq_info, name, None)
            if view is None:
                if name != "step_view":
                    return None
                prefixes.append(None)
                continue
            inner = getattr(getattr(view, "tree", None), "container", None)
            if not isinstance(inner, PrefixView) or not isinstance(inner.parent, RocksContainer):
                return None
            if container is not None and inner.parent is not container:
                return None
            container = inner.parent
            prefixes.append(inner.prefix)
        return (container, tuple(prefixes)) if container is not None else None

    def _flush_one(self, key: tuple[int, str]) -> None:
        entry = self._dirty.pop(key, None)
        if entry is not None:
            self._write(key, *entry)

    def _write(self, key: tuple[int, str], seq_info: Any, last: Any, last_step: int) -> None:
        tree = self.tracker.meta_run_tree
        ctx_idx, name = key
        if last_step >= 0:
            tree["traces", ctx_idx, name, "last"] = last
            tree["traces", ctx_idx, name, "last_step"] = last_step
        if seq_info.version == 2:
            tree["traces", ctx_idx, name, "max"] = seq_info.max
            tree["traces", ctx_idx, name, "min"] = seq_info.min

    def flush(self) -> None:
        """Write the summary keys (last value and step, min, max) of the sequences that changed."""
        dirty, self._dirty = self._dirty, {}
        for key, entry in dirty.items():
            self._write(key, *entry)


def _ctx_key(context: dict[str, Any] | None) -> str:
    if not context:
        return ""
    return json.dumps(context, sort_keys=True, default=str)


class _GroupCommit(threading.local):
    batches: dict[int, tuple[Any, Any]] | None = None
    sizes_memtables = False  # (the writer's thread: see `size_memtables_in_this_thread`)


_group = _GroupCommit()
_patched = False
WRITE_BUFFER_OPTIONS = {
    "write_buffer_size": 8 * 1024 * 1024,
    "db_write_buffer_size": 16 * 1024 * 1024,
    "max_write_buffer_number": 2,
}


def install_group_commit() -> bool:
    """Let one thread collect Aim's RocksDB writes into one WriteBatch per container.

    Aim commits a RocksDB write for every key it sets (about 8 per tracked value). Collecting
    the writes of a whole batch of records and committing them once makes storing ~1.5x faster.
    Only the thread inside `group_commit()` is affected; everything else writes through as usual.
    """
    global _patched
    if _patched:
        return True
    try:
        import aimrocks
        from aim.storage.rockscontainer import RocksContainer
    except Exception:
        return False
    orig_batch, orig_commit = RocksContainer.batch, RocksContainer.commit

    def batch(self: Any) -> Any:
        pending = _group.batches
        if pending is None:
            return orig_batch(self)
        entry = pending.get(id(self))
        if entry is None:
            entry = pending[id(self)] = (self, aimrocks.WriteBatch())
        return entry[1]

    def commit(self: Any, write_batch: Any) -> None:
        if _group.batches is None:
            orig_commit(self, write_batch)

    orig_db = RocksContainer.__dict__.get("db")
    if isinstance(orig_db, property) and orig_db.fget is not None:
        open_db = orig_db.fget

        def db(self: Any) -> Any:
            # Aim's 1 MB memtable makes RocksDB flush and compact almost continuously under a
            # stream of small writes: its background threads took ~0.8 of a core beside the
            # writer. Larger memtables cut that work several-fold (up to 2 x 8 MB per
            # container). Set just before Aim opens the database, on first use: its `__init__`
            # opens it in its last line, and options changed after that are never read.
            # Only in the writer's own thread: an Aim run the application opens itself (thread
            # writer) keeps Aim's sizes.
            resources = getattr(self, "_resources", None)  # (Aim's internals: never a raise)
            if (_group.sizes_memtables and resources is not None and getattr(resources, "_db", True) is None
                    and not getattr(self, "read_only", True)
                    and isinstance(getattr(self, "_db_opts", None), dict)):
                self._db_opts.update(WRITE_BUFFER_OPTIONS)
            return open_db(self)

        RocksContainer.db = property(db)
    RocksContainer.batch = batch
    RocksContainer.commit = commit
    RocksContainer._aim_llama_commit = staticmethod(orig_commit)
    _patched = True
    return True


def size_memtables_in_this_thread() -> None:
    """Give the Aim databases this thread opens from now on the writer's larger memtables."""
    _group.sizes_memtables = True


class group_commit:
    """Context manager: defer and merge RocksDB writes made by this thread until exit."""

    def __enter__(self) -> None:
        if _group.batches is None and install_group_commit():
            _group.batches = {}
            self.active = True
        else:
            self.active = False

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        pending, _group.batches = _group.batches, None
        for container, write_batch in (pending or {}).values():
            type(container)._aim_llama_commit(container, write_batch)
