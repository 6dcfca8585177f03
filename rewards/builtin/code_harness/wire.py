"""Plain data between the judge and the solution's process: newline-delimited JSON with tagged containers.

What crosses is only builtin data of exact types: None, bool, int, float (inf/nan included), str, and list, tuple,
dict, set, frozenset, bytes, complex made of those. Subclasses (an `int` whose `__eq__` is always true) and other
objects are refused where they are encoded, and the decoder builds values with the builtin constructors only, so a
value can never carry behaviour of its own across the boundary. A JSON array is a list; every JSON object is one
tag ({"tuple": [...]}, {"dict": [[k, v], ...]}, ...), so no user dict can be mistaken for a tag.

Standard library only: shipped into the sandbox as a file and loaded by both sides.
"""
import base64
import json

MAX_DEPTH = 200


class NotPlainData(TypeError):
    """A value that cannot cross: wrong type, too deep, or a malformed message."""


_SCALARS = (str, int, float, bool)


def _deeper(depth):
    if depth >= MAX_DEPTH:
        raise NotPlainData(f"data nested deeper than {MAX_DEPTH} levels")
    return depth + 1


def encode(value, ref_name=None, depth=0):
    """The wire form of `value`. `ref_name(value)` may name an object that crosses as a reference (the judge's
    proxies of the solution's own functions); it returns None for anything else."""
    kind = type(value)
    if value is None or kind in _SCALARS:
        return value
    inner = _deeper(depth)
    if kind is list:
        return [encode(v, ref_name, inner) for v in value]
    if kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [encode(v, ref_name, inner) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, ref_name, inner), encode(v, ref_name, inner)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": base64.b64encode(value).decode("ascii")}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    name = ref_name(value) if ref_name is not None else None
    if name is not None:
        return {"ref": name}
    raise NotPlainData(f"a {kind.__module__}.{kind.__qualname__} cannot cross as plain data")


def decode(data, resolve_ref=None, depth=0):
    """The value of a wire form; raises NotPlainData for anything that is not exactly what `encode` writes."""
    if data is None or type(data) in _SCALARS:
        return data
    inner = _deeper(depth)
    if type(data) is list:
        return [decode(v, resolve_ref, inner) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise NotPlainData(f"malformed value {str(data)[:80]!r}")
    (tag, payload), = data.items()
    try:
        if tag in ("tuple", "set", "frozenset") and type(payload) is list:
            items = [decode(v, resolve_ref, inner) for v in payload]
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and type(payload) is list:
            pairs = []
            for pair in payload:
                if type(pair) is not list or len(pair) != 2:
                    raise NotPlainData("malformed dict item")
                pairs.append((decode(pair[0], resolve_ref, inner), decode(pair[1], resolve_ref, inner)))
            return dict(pairs)
        if tag == "bytes" and type(payload) is str:
            return base64.b64decode(payload.encode("ascii"), validate=True)
        if tag == "complex" and type(payload) is list and len(payload) == 2 \
                and all(type(x) in (int, float) for x in payload):
            return complex(payload[0], payload[1])
        if tag == "ref" and type(payload) is str and resolve_ref is not None:
            return resolve_ref(payload)
    except NotPlainData:
        raise
    except (TypeError, ValueError) as exc:  # an unhashable key or set item, bad base64
        raise NotPlainData(f"malformed {tag}: {exc}") from None
    raise NotPlainData(f"malformed value {str(data)[:80]!r}")


def dumps(message):
    """One message as a line of ASCII JSON (non-ASCII and lone surrogates escaped)."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("ascii")


class LineReader:
    """Reads newline-terminated JSON messages from a socket, refusing any longer than `max_bytes`."""

    def __init__(self, sock, max_bytes):
        self.sock, self.max_bytes, self.buffer, self.scanned = sock, max_bytes, bytearray(), 0

    def read(self):
        """The next message (a dict), or None at end of stream."""
        while True:
            end = self.buffer.find(b"\n", self.scanned)
            if end >= 0:
                break
            self.scanned = len(self.buffer)
            if self.scanned > self.max_bytes:
                raise NotPlainData(f"message longer than {self.max_bytes} bytes")
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        self.scanned = 0
        if len(line) > self.max_bytes:
            raise NotPlainData(f"message longer than {self.max_bytes} bytes")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise NotPlainData(f"not a JSON message: {exc}") from None
        if type(message) is not dict:
            raise NotPlainData("a message must be a JSON object")
        return message
