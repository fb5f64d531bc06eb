"""Case generators for the header fuzz tests: valid safetensors files and ways to break them.

Hypothesis drives the tests (which mutation, which seed; deterministic with derandomize), and each seed
feeds a `random.Random` that builds the file here. Drawing every small value through hypothesis cost
~7 ms a case (its per-draw bookkeeping), which made 10 000 cases take minutes on a 2-core machine; a
seeded generator builds a case in well under a millisecond, so each hypothesis example runs many cases.

A file is built from a list of tensor specs, so that a mutation can break exactly one rule of the
format; `malformed_file` only returns files that break at least one rule.
"""

from __future__ import annotations

import json
import random
import struct

from merge_lab.io.header import ITEMSIZE, MAX_HEADER_BYTES

DTYPE_NAMES = sorted(ITEMSIZE)
U64 = (1 << 64) - 1

NAME_POOL = [
    "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.bias",
    "cond_stage_model.transformer.text_model.embeddings.position_ids", "a", "b", "w", "", " ", "0", "1.0",
    "__metadata", "__metadata__ ", "dtype", "shape", "data_offsets", "ключ", "模型.权重", "é", "e\u0301", "🙂",
    "a\nb", "tab\there", "quote\"d", "back\\slash", "x" * 300, "\x7f", "\u2028", "\ufeffbom",
]
# Characters for random text: ASCII (controls included), JSON syntax, and any code point but surrogates.
_CHAR_SOURCES = [
    lambda r: chr(r.randrange(0x20, 0x7F)),
    lambda r: chr(r.randrange(0, 0x20)),
    lambda r: r.choice('{}[]":,\\ '),
    lambda r: chr(r.choice([r.randrange(0x80, 0xD800), r.randrange(0xE000, 0x110000)])),
]
FLOATS = [0.0, -0.0, 1.0, -1.5, 1e308, -1e308, 5e-324, 2.0 ** 64, 1e-7]


def text(r: random.Random, max_size: int) -> str:
    return "".join(r.choice(_CHAR_SOURCES)(r) for _ in range(r.randint(0, max_size)))


def name(r: random.Random) -> str:
    while True:
        s = r.choice(NAME_POOL) if r.random() < 0.7 else text(r, 6)
        if s != "__metadata__":
            return s


def names(r: random.Random, min_size: int, max_size: int) -> list[str]:
    out: list[str] = []
    for _ in range(r.randint(min_size, max_size)):
        s = name(r)
        if s not in out:
            out.append(s)
    while len(out) < min_size:
        out.append(f"k{len(out)}")
    return out


def a_float(r: random.Random) -> float:
    return r.choice(FLOATS) if r.random() < 0.5 else r.uniform(-1e6, 1e6)


def an_int(r: random.Random) -> int:
    return r.choice([0, 1, -1, 2, 1 << 31, 1 << 63, U64, 1 << 64, -(1 << 63), r.randint(-(1 << 70), 1 << 70)])


def non_int_value(r: random.Random):
    """Any JSON value that is not an integer (bool is not one here either)."""
    return r.choice([
        lambda: None, lambda: r.random() < 0.5, lambda: a_float(r), lambda: text(r, 5),
        lambda: [an_int(r) for _ in range(r.randint(0, 2))],
        lambda: {text(r, 2): an_int(r) for _ in range(r.randint(0, 2))},
    ])()


def not_a_list(r: random.Random):
    return r.choice([
        lambda: None, lambda: r.random() < 0.5, lambda: an_int(r), lambda: a_float(r), lambda: text(r, 5),
        lambda: {text(r, 2): an_int(r) for _ in range(r.randint(0, 2))},
    ])()


def tensor_specs(r: random.Random, allow_empty: bool = False) -> list[tuple[str, str, list[int]]]:
    """[(name, dtype, shape)] with distinct names; every tensor has at least one element."""
    return [(k, r.choice(DTYPE_NAMES), [r.randint(1, 4) for _ in range(r.randint(0, 3))])
            for k in names(r, 0 if allow_empty else 1, 4)]


def nbytes(dtype: str, shape: list[int]) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def layout(specs, order) -> tuple[dict, int]:
    """The header dict for `specs`, their data packed in `order`; returns (header, data size)."""
    offsets, offset = {}, 0
    for i in order:
        _, dtype, shape = specs[i]
        offsets[i] = [offset, offset + nbytes(dtype, shape)]
        offset += nbytes(dtype, shape)
    header = {name_: {"dtype": dtype, "shape": list(shape), "data_offsets": offsets[i]}
              for i, (name_, dtype, shape) in enumerate(specs)}
    return header, offset


def encode(header_text: bytes, data: bytes, *, length: int | None = None, pad: int = 0) -> bytes:
    blob = header_text + b" " * pad
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def dumps(header) -> bytes:
    try:
        return json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: written as a JSON \\udXXX escape
        return json.dumps(header).encode("ascii")


def valid_file(r: random.Random, specs=None) -> tuple[bytes, dict, bytes]:
    """(file bytes, header dict, data) of a valid file: tensors in random data order, optional metadata,
    optional header padding, keys in random JSON order."""
    specs = specs if specs is not None else tensor_specs(r, allow_empty=True)
    order = list(range(len(specs)))
    r.shuffle(order)
    header, size = layout(specs, order)
    if r.random() < 0.5:
        header["__metadata__"] = {name(r): r.choice(["", "v", "{\"json\": [1, 2]}", "ü" * 40, text(r, 8)])
                                  for _ in range(r.randint(0, 3))}
    items = list(header.items())
    r.shuffle(items)
    header = dict(items)
    data = r.randbytes(size)
    return encode(dumps(header), data, pad=r.randint(0, 7)), header, data


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _unknown_dtype(r):
    if r.random() < 0.5:
        return non_int_value(r)
    s = text(r, 8)
    return s if s not in ITEMSIZE else s + "?"


def _bad_metadata(r):
    kind = r.randrange(3)
    if kind == 0:  # not an object (null is allowed by the reader, so never null)
        v = not_a_list(r)
        return v if v is not None and not isinstance(v, dict) else 1
    if kind == 1:
        return [text(r, 3) for _ in range(r.randint(0, 3))]
    bad = non_int_value(r)
    return {name(r): bad if not isinstance(bad, str) else None}


MUTATIONS = [
    "dtype-unknown", "dtype-other-size", "field-missing", "shape-not-list", "shape-bad-dim", "shape-mismatch",
    "shape-too-many-dims", "shape-overflow", "shape-huge-dim", "shape-huge-product", "offsets-not-pair",
    "offsets-not-int", "offsets-negative", "offsets-huge", "offsets-reversed", "offsets-shifted",
    "offsets-overlap", "entry-not-object", "metadata-bad", "metadata-surrogate", "name-surrogate",
    "not-an-object", "deep-nesting", "duplicate-key", "json-constant", "bad-utf8", "json-truncated",
    "length-beyond-file", "length-beyond-limit", "length-short", "data-truncated", "data-trailing",
    "data-hole", "short-file",
]


def malformed_file(r: random.Random, kind: str) -> bytes:
    """A valid file with one mutation of `kind` that makes it invalid."""
    specs = tensor_specs(r)
    _, header, data = valid_file(r, specs)
    names_ = _tensor_names(header)
    name_ = r.choice(names_)
    entry = header[name_]
    text_ = None  # a mutation may produce the header text itself
    length = None
    pad = 0

    if kind == "dtype-unknown":
        entry["dtype"] = _unknown_dtype(r)
    elif kind == "dtype-other-size":
        entry["dtype"] = r.choice([d for d in DTYPE_NAMES if ITEMSIZE[d] != ITEMSIZE[entry["dtype"]]])
    elif kind == "field-missing":
        del entry[r.choice(["dtype", "shape", "data_offsets"])]
    elif kind == "shape-not-list":
        entry["shape"] = not_a_list(r)
    elif kind == "shape-bad-dim":
        dims = entry["shape"] or [1]
        dims[r.randrange(len(dims))] = r.choice([r.randint(-(1 << 70), -1), non_int_value(r), 2.0])
        entry["shape"] = dims
    elif kind == "shape-mismatch":  # more elements, same offsets
        dims = list(entry["shape"]) or [1]
        dims[r.randrange(len(dims))] += r.randint(1, 1 << 20)
        entry["shape"] = dims
    elif kind == "shape-too-many-dims":
        entry["shape"] = [1] * r.randint(17, 300)
    elif kind == "shape-overflow":
        # the element count or the byte size leaves the u64 range (Python would not notice; Rust and C do)
        entry["shape"] = [r.randint(1 << 20, 1 << 62) for _ in range(r.randint(4, 6))]
    elif kind == "shape-huge-dim":  # an empty tensor with a dimension beyond torch's int64 sizes
        entry["shape"] = [0, r.randint(1 << 63, 1 << 70)]
    elif kind == "shape-huge-product":
        # fits in u64 but is far beyond the file: refused by arithmetic, never by allocating
        entry["shape"] = [r.randint(1 << 30, 1 << 40), r.randint(1 << 10, 1 << 20)]
    elif kind == "offsets-not-pair":
        if r.random() < 0.5:
            entry["data_offsets"] = not_a_list(r)
        else:
            entry["data_offsets"] = [r.randint(0, 100) for _ in range(r.choice([0, 1, 3, 4, 5]))]
    elif kind == "offsets-not-int":
        entry["data_offsets"][r.randrange(2)] = non_int_value(r)
    elif kind == "offsets-negative":
        entry["data_offsets"][r.randrange(2)] = r.randint(-(1 << 70), -1)
    elif kind == "offsets-huge":
        entry["data_offsets"] = [r.randint(0, U64), r.randint(len(data) + 1, 1 << 80)]
    elif kind == "offsets-reversed":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = [e + r.randint(1, 100), b]
    elif kind == "offsets-shifted":
        # same length, moved: it overlaps a neighbour, leaves a hole or runs past either end
        shift = r.choice([-1, 1]) * r.randint(1, 1 << 12)
        b, e = entry["data_offsets"]
        entry["data_offsets"] = [b + shift, e + shift]
    elif kind == "offsets-overlap":
        others = [x for x in names_ if x != name_]
        if not others:
            data = data + b"\0"  # one tensor: nothing to overlap; break the file with a trailing byte
        else:
            b = header[r.choice(others)]["data_offsets"][0]
            entry["data_offsets"] = [b, b + nbytes(entry["dtype"], entry["shape"])]  # same start: overlap
    elif kind == "entry-not-object":
        v = not_a_list(r) if r.random() < 0.5 else [an_int(r) for _ in range(r.randint(0, 3))]
        header[name_] = v if not isinstance(v, dict) else None
    elif kind == "metadata-bad":
        header["__metadata__"] = _bad_metadata(r)
    elif kind == "metadata-surrogate":
        header["__metadata__"] = {"k": "x\ud800y"}
    elif kind == "name-surrogate":
        header["\udc80" + name_] = header.pop(name_)
    elif kind == "not-an-object":
        v = r.choice([None, r.random() < 0.5, an_int(r), text(r, 10), [an_int(r) for _ in range(r.randint(0, 5))]])
        text_ = json.dumps(v).encode()
    elif kind == "deep-nesting":
        depth = r.randint(2_000, 200_000)
        inner = b"[" * depth + b"]" * depth
        where = r.choice(["top", "entry", "metadata"])
        body = dumps(header)
        marker = json.dumps(name_, ensure_ascii=False).encode() + b": {"
        if where == "metadata":
            text_ = b'{"__metadata__": ' + inner + b", " + body[1:]
        elif where == "entry" and marker in body:
            text_ = body.replace(marker, marker + b'"nested": ' + inner + b", ", 1)
        else:
            text_ = inner
    elif kind == "duplicate-key":
        dup = json.dumps(name_, ensure_ascii=False).encode() + b": " + json.dumps(entry, ensure_ascii=False).encode()
        text_ = b"{" + dup + b", " + dumps(header)[1:]
    elif kind == "json-constant":
        body = dumps(header)
        token = r.choice([b"NaN", b"Infinity", b"-Infinity"])
        if r.random() < 0.5:
            text_ = b'{"__metadata__": {"x": ' + token + b"}, " + body[1:]
        else:
            text_ = body.replace(b'"data_offsets": [', b'"data_offsets": [' + token + b", ", 1)
    elif kind == "bad-utf8":
        body = bytearray(dumps(header))
        i = r.randint(1, len(body) - 1)
        body[i:i] = r.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        text_ = bytes(body)
    elif kind == "json-truncated":  # a proper prefix of an object's text is never JSON
        body = dumps(header)
        text_ = body[: r.randrange(len(body))]
    elif kind == "length-beyond-file":
        text_ = dumps(header)
        length = len(text_) + len(data) + r.randint(1, 1 << 20)
    elif kind == "length-beyond-limit":
        text_ = dumps(header)
        length = r.randint(MAX_HEADER_BYTES + 1, U64)
    elif kind == "length-short":  # cuts the JSON, or leaves padding bytes before the data
        text_ = dumps(header)
        pad = r.randint(0, 7)
        length = r.randrange(len(text_) + pad)
    elif kind == "data-truncated":  # every tensor has at least one element, so there is data to cut
        data = data[: len(data) - r.randint(1, len(data))]
    elif kind == "data-trailing":
        data = data + r.randbytes(r.randint(1, 64))
    elif kind == "data-hole":  # unused bytes before one tensor, later offsets moved past them
        at = entry["data_offsets"][0]
        gap = r.randint(1, 16)
        data = data[:at] + b"\0" * gap + data[at:]
        for x in names_:
            b, e = header[x]["data_offsets"]
            if b >= at:
                header[x]["data_offsets"] = [b + gap, e + gap]
    elif kind == "short-file":
        return r.randbytes(r.randint(0, 7))
    else:
        raise ValueError(kind)

    if text_ is None:
        text_ = dumps(header)
    return encode(text_, data, length=length, pad=pad)


def json_value(r: random.Random, leaves: list[int]):
    """Random JSON; `leaves` is a one-element budget shared by the whole document."""
    leaves[0] -= 1
    if leaves[0] <= 0 or r.random() < 0.5:
        return r.choice([None, r.random() < 0.5, an_int(r), a_float(r), text(r, 8)])
    if r.random() < 0.5:
        return [json_value(r, leaves) for _ in range(r.randint(0, 4))]
    return {text(r, 6): json_value(r, leaves) for _ in range(r.randint(0, 4))}


def header_like_entry(r: random.Random) -> dict:
    """An object with some of dtype / shape / data_offsets, each often right-looking, sometimes anything."""
    entry = {}
    if r.random() < 0.8:
        entry["dtype"] = r.choice(DTYPE_NAMES) if r.random() < 0.7 else json_value(r, [4])
    if r.random() < 0.8:
        entry["shape"] = ([r.randint(-2, 5) for _ in range(r.randint(0, 3))] if r.random() < 0.7
                          else json_value(r, [4]))
    if r.random() < 0.8:
        entry["data_offsets"] = ([r.randint(-2, 40), r.randint(-2, 40)] if r.random() < 0.7
                                 else json_value(r, [4]))
    return entry


def json_header_file(r: random.Random) -> bytes:
    """Arbitrary JSON (mostly objects shaped like headers) with a right length and some data."""
    if r.random() < 0.2:
        doc = json_value(r, [12])
    else:
        doc = {name(r): header_like_entry(r) if r.random() < 0.8 else json_value(r, [6])
               for _ in range(r.randint(0, 4))}
    return encode(dumps(doc), r.randbytes(r.randint(0, 64)), pad=r.randint(0, 7))


GARBAGE_STARTS = [b"", b"{", b'{"', b'{"a": {"dtype": "F16", ', b"[", b" "]


def prefixed_garbage(r: random.Random) -> bytes:
    """A length prefix (usually right) followed by arbitrary bytes, often starting like JSON."""
    body = r.choice(GARBAGE_STARTS) + r.randbytes(r.randint(0, 200))
    length = len(body) if r.random() < 0.5 else r.choice([r.randint(0, 300), r.randint(0, U64)])
    return struct.pack("<Q", length) + body + r.randbytes(r.randint(0, 64))


def byte_edited_file(r: random.Random) -> bytes:
    """A valid file with 1 to 4 random byte edits anywhere (it may, rarely, stay valid)."""
    buf = bytearray(valid_file(r)[0])
    for _ in range(r.randint(1, 4)):
        op, i = r.choice(["flip", "delete", "insert"]), r.randrange(max(1, len(buf)))
        if op == "flip" and buf:
            buf[i] ^= r.randint(1, 255)
        elif op == "delete":
            del buf[i:i + r.randint(1, 8)]
        else:
            buf[i:i] = r.randbytes(r.randint(1, 8))
    return bytes(buf)
