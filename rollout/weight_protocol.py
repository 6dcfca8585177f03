"""The wire format of a weight push, shared by the sending trainer ranks and the receiving engines.

A push of weight version v is a sequence of buckets. A bucket is one flat byte buffer holding HF-named tensors
back to back (each at an offset aligned to its element size, padding entries in between where needed), ending in
an int64 check entry [version, bucket index, payload bytes, checksum, algorithm]. The same layout goes through SGLang's
flattened-bucket tensor update (colocated) and through its flattened-bucket broadcast (distributed), so a
receiver can always verify what it got before loading it.

Both sides import this module (rollout must not import trainer), so it holds only the format: no I/O. It imports
torch only where it reads or writes tensors: the driver imports it (through rollout/engine.py) to start the engine
actors, before it needs torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Entries whose names start with this are part of the protocol, never model weights: the receiver strips them.
PROTOCOL_PREFIX = "slipstream."
CHECK_NAME = PROTOCOL_PREFIX + "bucket_check"
PAD_NAME = PROTOCOL_PREFIX + "pad"
_CHECK_FIELDS = 5  # version, index, payload bytes, checksum, algorithm (its index in ALGORITHMS)
_MASK64 = (1 << 64) - 1
_WORDS_PER_CHUNK = 64
_SLICE_CHUNKS = 4096  # "sums": chunks summed per step (2 MiB of data, 32 KiB per temporary)
# Most a checksum allocates at once ("sums": chunk sums, their weighted copy, the lane numbers, a padded tail).
CHECKSUM_WORKING_BYTES = 4 * 8 * _SLICE_CHUNKS
ALGORITHMS = ("xxh3", "sums")
# Weight-name requests the engines' scheduler answers itself (rollout/weight_receiver.py), and the word that starts
# its log line when it has verified a bucket.
READBACK_PREFIX = PROTOCOL_PREFIX + "readback:"
VERIFIED_MARKER = "slipstream-verified"


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a bucket: where its bytes lie and how to read them back."""

    name: str
    dtype: str  # a torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the bucket
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This entry as a tensor viewing `flat` (a uint8 buffer laid out by `layout_bucket`)."""
        return flat[self.offset:self.offset + self.nbytes].view(self.torch_dtype).view(self.shape)


@dataclass(frozen=True)
class BucketLayout:
    """The entries of one bucket in order (padding and the final check entry included)."""

    entries: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        last = self.entries[-1]
        return last.offset + last.nbytes

    @property
    def payload_nbytes(self) -> int:
        """Bytes before the check entry: what the checksum covers."""
        return self.entries[-1].offset

    @property
    def weights(self) -> tuple[TensorSpec, ...]:
        """The model tensors (protocol entries left out)."""
        return tuple(e for e in self.entries if not e.name.startswith(PROTOCOL_PREFIX))


def layout_bucket(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> BucketLayout:
    """Places (name, dtype, shape) entries back to back, each aligned to its element size, then the check entry.

    Offsets are consecutive (a pad entry fills each gap) because SGLang's distributed receive rebuilds the layout
    from names, dtypes and shapes alone and rejects a misaligned entry."""
    import torch

    entries: list[TensorSpec] = []
    offset = 0

    def place(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        nonlocal offset
        gap = -offset % dtype.itemsize
        if gap:
            entries.append(TensorSpec(PAD_NAME, "uint8", (gap,), offset, gap))
            offset += gap
        nbytes = _numel(shape) * dtype.itemsize
        entries.append(TensorSpec(name, str(dtype).removeprefix("torch."), tuple(shape), offset, nbytes))
        offset += nbytes

    for name, dtype, shape in tensors:
        if name.startswith(PROTOCOL_PREFIX):
            raise ValueError(f"{name}: names starting with {PROTOCOL_PREFIX!r} are reserved for the push protocol")
        place(name, dtype, tuple(shape))
    place(CHECK_NAME, torch.int64, (_CHECK_FIELDS,))
    return BucketLayout(tuple(entries))


def write_check(flat: torch.Tensor, layout: BucketLayout, version: int, index: int) -> int:
    """Computes the checksum of the payload bytes and writes the check entry; returns the checksum."""
    import torch

    algorithm = default_algorithm(flat)
    value = checksum(flat[:layout.payload_nbytes], algorithm)
    check = torch.tensor([version, index, layout.payload_nbytes, _signed(value), ALGORITHMS.index(algorithm)],
                         dtype=torch.int64)
    layout.entries[-1].view(flat).copy_(check)
    return value


def verify_check(flat: torch.Tensor, layout_payload_nbytes: int, check: torch.Tensor,
                 version: int | None = None, index: int | None = None) -> None:
    """Raises ValueError naming what differs when the received bucket is not the one that was sent."""
    got_version, got_index, nbytes, sent, algorithm = (int(x) for x in check.tolist())
    if nbytes != layout_payload_nbytes:
        raise ValueError(f"bucket {got_index} of version {got_version}: {layout_payload_nbytes} payload bytes "
                         f"received, {nbytes} sent (sender and receiver disagree on the layout)")
    if version is not None and got_version != version:
        raise ValueError(f"bucket {got_index}: weight version {got_version} received, {version} expected")
    if index is not None and got_index != index:
        raise ValueError(f"bucket {got_index} received where bucket {index} was expected")
    if not 0 <= algorithm < len(ALGORITHMS):
        raise ValueError(f"bucket {got_index} of version {got_version}: unknown checksum algorithm {algorithm}")
    value = checksum(flat[:nbytes], ALGORITHMS[algorithm])
    if value != sent & _MASK64:
        raise ValueError(f"bucket {got_index} of version {got_version}: checksum {value:016x} of the received "
                         f"bytes != {sent & _MASK64:016x} sent")


def checksum(data: torch.Tensor, algorithm: str | None = None) -> int:
    """A 64-bit checksum of a tensor's bytes, by `algorithm` (default: the tensor's device's, see
    `default_algorithm`). It guards against corrupted, truncated, misaligned or reordered transfers; "sums" is
    not a cryptographic hash and "xxh3" is not one either.

    - "xxh3": xxHash's XXH3-64 of the bytes (CPU, ~10 GB/s on one core here; a CUDA tensor is copied to the host);
    - "sums": plain torch integer reductions where the tensor lies (a GPU, without a host copy): the bytes read as
      int64 words, summed in chunks of 64 words, the chunk sums combined with their positions (mod 2**64); a
      reordering inside one 512-byte chunk goes unseen. Walked in slices, so its temporaries stay under
      CHECKSUM_WORKING_BYTES."""
    import torch

    flat = data.detach().contiguous().reshape(-1).view(torch.uint8)
    algorithm = algorithm or default_algorithm(flat)
    if algorithm == "xxh3":
        import xxhash

        host = flat.cpu() if flat.device.type != "cpu" else flat
        return xxhash.xxh3_64_intdigest(memoryview(host.numpy()))
    if algorithm != "sums":
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {list(ALGORITHMS)}")
    nbytes = flat.numel()
    if flat.storage_offset() % 8:
        flat = flat.clone()  # int64 views need 8-byte alignment
    chunk_bytes = 8 * _WORDS_PER_CHUNK
    whole = nbytes // chunk_bytes * chunk_bytes
    words = flat[:whole].view(torch.int64).view(-1, _WORDS_PER_CHUNK)
    lanes = torch.arange(min(_SLICE_CHUNKS, words.shape[0]), dtype=torch.int64, device=flat.device)
    weighted = plain = 0
    chunks = words.shape[0]
    for start in range(0, chunks, _SLICE_CHUNKS):
        sums = words[start:start + _SLICE_CHUNKS].sum(dim=1)
        total = int(sums.sum())
        # sum over chunks c of (c + 1) * sums[c], with c = start + lane
        weighted += (start + 1) * total + int((sums * lanes[:sums.numel()]).sum())
        plain += total
    if whole < nbytes:  # the tail, zero-padded to one chunk, is chunk number `chunks`
        tail = torch.zeros(chunk_bytes, dtype=torch.uint8, device=flat.device)
        tail[:nbytes - whole] = flat[whole:]
        total = int(tail.view(torch.int64).sum())
        weighted += (chunks + 1) * total
        plain += total
    return ((weighted & _MASK64) * 0x9E3779B97F4A7C15 + (plain & _MASK64) * 0xC2B2AE3D27D4EB4F + nbytes) & _MASK64


def default_algorithm(t: torch.Tensor) -> str:
    """xxh3 for tensors in host memory, sums for device memory (no host copy)."""
    return "xxh3" if t.device.type == "cpu" else "sums"


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
