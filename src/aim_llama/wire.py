"""Records as bytes: how a chunk of records is pickled on submit and read back in the writer.

Pickling a named tuple goes through `object.__reduce_ex__` and a Python-level
`__getnewargs__` call per record (~2 µs each, ~45 µs per RAG query on the application's
thread). A chunk is therefore pickled as plain tuples: `(code, *fields)` per record, where
`code` is the record's type, and a `Track` carries one more field, the type code of its
value (a `Clipped`, `TraceValue`, `NodesValue` or `RerankValue` travels as a plain tuple). That is ~4× less
CPU on the application's thread; the writer rebuilds the named tuples.

Each chunk is framed with its record count and size, so that a chunk the writer cannot
unpickle (a value of a class only the application has) is skipped and counted lost, not taken
for the end of the stream; a class the writer lacks is read, where it can be, as its plain
value (a `str` subclass as its `str`).
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any, get_args

from .records import Clipped, NodesValue, Record, RerankValue, TraceValue, Track

_RECORDS: tuple[type, ...] = get_args(Record)  # codes 0.. in the union's order; Track is 0
_VALUES: tuple[type, ...] = (Clipped, TraceValue, NodesValue, RerankValue)  # value codes 1..4
assert _RECORDS[0] is Track
_RECORD_CODE = {cls: code for code, cls in enumerate(_RECORDS)}
_VALUE_CODE = {cls: code for code, cls in enumerate(_VALUES, 1)}
_OTHER = -1  # anything else (a subclass, a test double): pickled as itself
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_new = tuple.__new__
_CHUNK = struct.Struct(">BII")  # marker, records in the chunk, size of its pickle
_MARK = 0x52  # b"R": a pickle (a control message) starts with its PROTO opcode, 0x80


class Records(list[Any]):
    """The records of one or more chunks, with the count of those that could not be read."""

    unreadable = 0
    why = ""

    def merge(self, other: Records) -> None:
        """Append `other`'s records, and its unreadable count."""
        self.extend(other)
        if other.unreadable:
            self.unreadable += other.unreadable
            self.why = self.why or other.why


def dumps(records: list[Record]) -> bytes:
    """One chunk of the queue: the records as plain tuples, pickled."""
    value_code = _VALUE_CODE.get
    record_code = _RECORD_CODE.get
    out: list[tuple[Any, ...]] = []
    append = out.append
    r: Any
    for r in records:
        cls = type(r)
        if cls is Track:
            value = r[1]
            vcode = value_code(type(value), 0)
            append((0, r[0], tuple(value) if vcode else value, r[2], r[3], r[4], vcode))
        else:
            code = record_code(cls)
            append((_OTHER, r) if code is None else (code, *r))
    data = pickle.dumps(out, protocol=_PROTOCOL)
    return _CHUNK.pack(_MARK, len(records), len(data)) + data


def decode(wire: list[tuple[Any, ...]]) -> list[Record]:
    """The records of one unpickled chunk."""
    records: list[Any] = []
    append = records.append
    for w in wire:
        code = w[0]
        if code == 0:
            vcode = w[6]
            value = _new(_VALUES[vcode - 1], w[2]) if vcode else w[2]
            append(_new(Track, (w[1], value, w[3], w[4], w[5])))
        elif code == _OTHER:
            append(w[1])
        else:
            append(_new(_RECORDS[code], w[1:]))
    return records


def loads_many(data: bytes) -> Any:
    """The records of several concatenated chunks as one `Records` list; a control message
    (one pickled object) as is."""
    if not data or data[0] != _MARK:
        return pickle.loads(data)
    records = Records()
    view = memoryview(data)
    at = 0
    while at < len(data):
        mark, count, size = (0, 1, 0) if at + _CHUNK.size > len(data) else _CHUNK.unpack_from(view, at)
        at += _CHUNK.size
        if mark != _MARK or at + size > len(data):  # (never from aim-llama's own framing)
            records.unreadable += count if mark == _MARK else 1
            records.why = records.why or "a garbled frame (the rest of it could not be counted)"
            break
        try:
            records.extend(decode(_Unpickler(io.BytesIO(view[at:at + size])).load()))
        except Exception as exc:
            records.unreadable += count
            records.why = records.why or f"{type(exc).__name__}: {exc}"
        at += size
    return records


def count_records(data: bytes) -> int:
    """How many records the chunks of a frame hold, read from their headers only (nothing is
    unpickled: for a frame the writer will not unpickle, which it still counts); 0 for a
    control message."""
    total = 0
    at = 0
    while at + _CHUNK.size <= len(data) and data[at] == _MARK:
        _mark, count, size = _CHUNK.unpack_from(data, at)
        total += count
        at += _CHUNK.size + size
    return total


class _Unpickler(pickle.Unpickler):
    """Reads a value of a class the writer does not have (defined in the application's
    `__main__`, say) as its plain value where it is one (a `str` subclass: the `str`)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _PlainValue


class _PlainValue:
    """Stands in for a missing class: built from one plain value, it is that value."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and type(args[0]) in (str, int, float, bytes):
            return args[0]
        raise pickle.UnpicklingError("a value of a class the writer process does not have")
