"""A word-level n-gram language model: its file format, its builder and its sampler.

Small enough to load in well under a second on any machine, yet a real model: the file is
read, checked and decoded on every load, the prompt's last words condition what comes
next, and ``temperature``, ``top_p``, ``max_tokens``, ``stop`` and ``seed`` shape the output.

Probabilities are interpolated Witten-Bell estimates from the longest context seen in
training down to unigrams, over a candidate set made of the ``TOP_K`` most frequent
successors at each order (exact enough to sample from, cheap enough to do per token).

File format (all integers little-endian)::

    b"MMNGRAM\\x01"  u32 header length  header (msgpack ``Header``)  body (msgpack ``Body``)

The body is not compressed: its arrays load with one copy each, and a CRC-32 in the header
catches truncation and corruption.

Token id 0 is the paragraph boundary: the context before a paragraph's first word and the
token emitted (as a newline) at its end. Each table of order ``k`` maps a context of
``k - 1`` ids, packed ``ID_BITS`` bits per id into one int64, to its successors sorted by
count (descending), stored as flat arrays so loading is a few ``frombytes`` calls.
"""

from __future__ import annotations

import math
import random
import re
import sys
import zlib
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import msgspec

from backends.loaders import LoadError
from backends.registry import ModelSpec

MAGIC = b"MMNGRAM\x01"
FORMAT_VERSION = 1
ID_BITS = 21
ID_MASK = (1 << ID_BITS) - 1
MAX_ORDER = 4  # three ids of context fit in one int64
BOUNDARY = "\n"
TOP_K = 32

_TOKEN_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%")
_NO_SPACE_AFTER = frozenset("([{")


def tokenize(text: str) -> list[str]:
    """Split text into words and single punctuation marks (blank lines are not kept)."""
    return _TOKEN_RE.findall(text)


def join_piece(prev: str | None, token: str) -> str:
    """The text ``token`` adds after ``prev``: a newline, or the token with spacing."""
    if token == BOUNDARY:
        return "\n"
    if prev is None or prev == BOUNDARY or prev in _NO_SPACE_AFTER or token in _NO_SPACE_BEFORE:
        return token
    return " " + token


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens back into readable text."""
    prev: str | None = None
    parts: list[str] = []
    for tok in tokens:
        parts.append(join_piece(prev, tok))
        prev = tok
    return "".join(parts)


def _u32(data: bytes) -> array[int]:
    arr = array("I")
    if arr.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte "I"
        raise LoadError("platform array('I') is not 32-bit")
    arr.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        arr.byteswap()
    return arr


def _i64(data: bytes) -> array[int]:
    arr = array("q")
    arr.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        arr.byteswap()
    return arr


def _le_bytes(arr: array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


class TableInfo(msgspec.Struct, frozen=True):
    """Sizes of one order's table, kept in the uncompressed header for inspection."""

    order: int
    contexts: int
    entries: int


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the file holds, readable without decompressing the body."""

    format: int
    name: str
    order: int
    vocab_size: int
    training_tokens: int
    tables: list[TableInfo]
    body_crc32: int
    body_bytes: int


class TableBlob(msgspec.Struct, frozen=True, array_like=True):
    """One order's table as little-endian array bytes."""

    order: int
    ctx_keys: bytes
    offsets: bytes
    totals: bytes
    next_ids: bytes
    counts: bytes


class Body(msgspec.Struct, frozen=True, array_like=True):
    """The compressed part: vocabulary, unigram counts and the context tables."""

    vocab: list[str]
    unigram: bytes
    tables: list[TableBlob]


class Table:
    """One order's table in memory: contexts sorted for bisection, successors by count."""

    __slots__ = ("counts", "ctx_keys", "next_ids", "offsets", "order", "totals")

    def __init__(self, blob: TableBlob) -> None:
        self.order = blob.order
        self.ctx_keys = _i64(blob.ctx_keys)
        self.offsets = _u32(blob.offsets)
        self.totals = _u32(blob.totals)
        self.next_ids = _u32(blob.next_ids)
        self.counts = _u32(blob.counts)
        n = len(self.ctx_keys)
        if len(self.offsets) != n + 1 or len(self.totals) != n:
            raise LoadError(f"order-{self.order} table is inconsistent")
        if len(self.next_ids) != len(self.counts) or self.offsets[-1] != len(self.next_ids):
            raise LoadError(f"order-{self.order} successor arrays are inconsistent")

    def blob(self) -> TableBlob:
        """Back to file form."""
        return TableBlob(
            order=self.order,
            ctx_keys=_le_bytes(self.ctx_keys),
            offsets=_le_bytes(self.offsets),
            totals=_le_bytes(self.totals),
            next_ids=_le_bytes(self.next_ids),
            counts=_le_bytes(self.counts),
        )

    def successors(self, key: int) -> tuple[dict[int, int], int, int] | None:
        """Top-``TOP_K`` successor counts, total count and distinct successors of a context."""
        i = bisect_left(self.ctx_keys, key)
        if i == len(self.ctx_keys) or self.ctx_keys[i] != key:
            return None
        start, end = self.offsets[i], self.offsets[i + 1]
        top = min(end, start + TOP_K)
        return dict(zip(self.next_ids[start:top], self.counts[start:top], strict=True)), (
            self.totals[i]
        ), end - start


def _pack(ids: Sequence[int]) -> int:
    key = 0
    for i in ids:
        key = (key << ID_BITS) | i
    return key


class NGramModel:
    """A decoded model: vocabulary, unigram counts and one table per order >= 2."""

    def __init__(self, name: str, vocab: list[str], unigram: array[int], tables: list[Table],
                 training_tokens: int) -> None:
        if not vocab or vocab[0] != BOUNDARY:
            raise LoadError("vocabulary must start with the boundary token")
        if len(unigram) != len(vocab):
            raise LoadError("unigram counts do not match the vocabulary")
        self.name = name
        self.vocab = vocab
        self.index = {tok: i for i, tok in enumerate(vocab)}
        self.unigram = unigram
        self.unigram_total = sum(unigram)
        self.tables = tables
        self.order = 1 + len(tables)
        self.training_tokens = training_tokens
        # Ids are assigned by descending frequency, so the first TOP_K are the top unigrams.
        self._unigram_top = range(min(TOP_K, len(vocab)))

    # -- file format -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Encode deterministically: same model, same bytes."""
        body = Body(
            vocab=self.vocab,
            unigram=_le_bytes(self.unigram),
            tables=[t.blob() for t in self.tables],
        )
        packed = msgspec.msgpack.encode(body)
        header = Header(
            format=FORMAT_VERSION,
            name=self.name,
            order=self.order,
            vocab_size=len(self.vocab),
            training_tokens=self.training_tokens,
            tables=[
                TableInfo(order=t.order, contexts=len(t.ctx_keys), entries=len(t.next_ids))
                for t in self.tables
            ],
            body_crc32=zlib.crc32(packed),
            body_bytes=len(packed),
        )
        head = msgspec.msgpack.encode(header)
        return MAGIC + len(head).to_bytes(4, "little") + head + packed

    @staticmethod
    def read_header(data: bytes) -> tuple[Header, int]:
        """The header and the offset where the body starts; raises LoadError if malformed."""
        if data[: len(MAGIC)] != MAGIC:
            raise LoadError("not an n-gram model file (bad magic)")
        start = len(MAGIC) + 4
        head_len = int.from_bytes(data[len(MAGIC) : start], "little")
        try:
            header = msgspec.msgpack.decode(data[start : start + head_len], type=Header)
        except msgspec.DecodeError as exc:
            raise LoadError(f"bad header: {exc}") from exc
        if header.format != FORMAT_VERSION:
            raise LoadError(f"unsupported format version {header.format}")
        return header, start + head_len

    @classmethod
    def from_bytes(cls, data: bytes) -> NGramModel:
        """Decode a model file's bytes, checking sizes and the body checksum."""
        header, offset = cls.read_header(data)
        packed = data[offset:]
        if len(packed) != header.body_bytes or zlib.crc32(packed) != header.body_crc32:
            raise LoadError("body is truncated or corrupt (checksum mismatch)")
        try:
            body = msgspec.msgpack.decode(packed, type=Body)
        except msgspec.DecodeError as exc:
            raise LoadError(f"bad body: {exc}") from exc
        tables = [Table(blob) for blob in body.tables]
        if [t.order for t in tables] != list(range(2, header.order + 1)):
            raise LoadError("tables do not cover orders 2..N")
        return cls(header.name, body.vocab, _u32(body.unigram), tables, header.training_tokens)

    # -- building ----------------------------------------------------------------------

    @classmethod
    def build(cls, name: str, documents: Iterable[Sequence[str]], order: int) -> NGramModel:
        """Count n-grams of ``documents`` (token lists; ``BOUNDARY`` ends a paragraph).

        Deterministic: ids go by descending frequency then text, tables are sorted.
        """
        if not 2 <= order <= MAX_ORDER:
            raise ValueError(f"order must be 2..{MAX_ORDER}")
        stream: list[str] = [BOUNDARY]
        for doc in documents:
            stream.extend(doc)
            if stream[-1] != BOUNDARY:
                stream.append(BOUNDARY)
        freq = Counter(stream)
        words = sorted((t for t in freq if t != BOUNDARY), key=lambda t: (-freq[t], t))
        vocab = [BOUNDARY, *words]
        if len(vocab) > ID_MASK:
            raise ValueError("vocabulary too large for the id packing")
        index = {t: i for i, t in enumerate(vocab)}
        ids = [index[t] for t in stream]
        unigram = array("I", (freq[t] for t in vocab))
        tables: list[Table] = []
        keys: list[int] = ids
        for k in range(2, order + 1):
            keys = [(prev << ID_BITS) | nxt for prev, nxt in zip(keys, ids[k - 1 :], strict=False)]
            tables.append(_table_from_counts(k, Counter(keys)))
        return cls(name, vocab, unigram, tables, len(ids))

    # -- sampling ----------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        """Known ids of the prompt's words, after a boundary; unknown words are skipped."""
        ids = [0]
        for tok in tokenize(prompt):
            i = self.index.get(tok)
            if i is None:
                i = self.index.get(tok.lower(), self.index.get(tok.capitalize()))
            if i is not None:
                ids.append(i)
        return ids

    def distribution(self, history: Sequence[int]) -> dict[int, float]:
        """Interpolated next-token probabilities over the candidate set."""
        levels: list[tuple[dict[int, int], int, int]] = []
        cands: set[int] = set(self._unigram_top)
        for table in self.tables:
            k = table.order
            if len(history) < k - 1:
                break
            found = table.successors(_pack(history[len(history) - (k - 1) :]))
            if found is None:
                break  # a longer context cannot exist if this one does not
            levels.append(found)
            cands.update(found[0])
        total = self.unigram_total
        probs = {w: self.unigram[w] / total for w in sorted(cands)}
        for counts, ctx_total, distinct in levels:
            denom = ctx_total + distinct
            probs = {w: (counts.get(w, 0) + distinct * p) / denom for w, p in probs.items()}
        return probs

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[str, int]:
        """Sample a continuation; ``temperature <= 0`` is greedy. Returns (text, tokens).

        ``cancelled`` is polled every few tokens; when it returns True, generation ends early.
        """
        rng = random.Random(seed)
        history = self.encode_prompt(prompt)
        keep = self.order - 1
        stops = [s for s in stop if s]
        longest_stop = max((len(s) for s in stops), default=0)
        text = ""
        prev: str | None = None
        generated = 0
        while generated < max_tokens:
            if cancelled is not None and generated % 16 == 0 and cancelled():
                break
            nxt = _pick(self.distribution(history[-keep:]), temperature, top_p, rng)
            generated += 1
            history.append(nxt)
            token = self.vocab[nxt]
            searched_from = max(0, len(text) - longest_stop)
            text += join_piece(prev, token)
            prev = token
            if stops:
                cut = min((i for s in stops if (i := text.find(s, searched_from)) >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    break
        return text.lstrip(" "), generated


_COUNT_BITS = 32
_COUNT_MAX = (1 << _COUNT_BITS) - 1


def _table_from_counts(order: int, counts: Counter[int]) -> Table:
    """Group packed (context, next) counts by context; successors by count, then id.

    One sort of plain ints does it: each entry becomes ``context | (MAX - count) | next``
    so ascending order is by context, then by descending count, then by id.
    """
    shift = _COUNT_BITS + ID_BITS
    ranked = sorted(
        ((key >> ID_BITS) << shift) | ((_COUNT_MAX - c) << ID_BITS) | (key & ID_MASK)
        for key, c in counts.items()
    )
    next_ids = array("I", [k & ID_MASK for k in ranked])
    cnts = array("I", [_COUNT_MAX - ((k >> ID_BITS) & _COUNT_MAX) for k in ranked])
    ctx_keys = array("q")
    offsets = array("I")
    totals = array("I")
    current = -1
    total = 0
    for i, k in enumerate(ranked):
        ctx = k >> shift
        if ctx != current:
            if current >= 0:
                totals.append(total)
            ctx_keys.append(ctx)
            offsets.append(i)
            current = ctx
            total = 0
        total += cnts[i]
    if current >= 0:
        totals.append(total)
    offsets.append(len(ranked))
    return Table(
        TableBlob(
            order=order,
            ctx_keys=_le_bytes(ctx_keys),
            offsets=_le_bytes(offsets),
            totals=_le_bytes(totals),
            next_ids=_le_bytes(next_ids),
            counts=_le_bytes(cnts),
        )
    )


def _pick(probs: dict[int, float], temperature: float, top_p: float, rng: random.Random) -> int:
    """Greedy, or temperature-scaled nucleus sampling (ties broken by token id)."""
    if temperature <= 0:
        return min(probs, key=lambda w: (-probs[w], w))
    logs = {w: math.log(p) / temperature for w, p in probs.items() if p > 0}
    top = max(logs.values())
    ranked = sorted(((math.exp(v - top), w) for w, v in logs.items()), key=lambda x: (-x[0], x[1]))
    total = sum(weight for weight, _ in ranked)
    limit = top_p * total
    kept: list[tuple[float, int]] = []
    acc = 0.0
    for weight, w in ranked:
        kept.append((weight, w))
        acc += weight
        if acc >= limit:
            break
    r = rng.random() * acc
    for weight, w in kept:
        r -= weight
        if r < 0:
            return w
    return kept[-1][1]


class NGramHandle:
    """A loaded n-gram model; generation is read-only, so threads may share it."""

    def __init__(self, model: NGramModel, context_length: int) -> None:
        self._model: NGramModel | None = model
        self._context_length = context_length

    @property
    def measured_vram_mb(self) -> int | None:
        """Runs on the CPU: the ledger charges the configured estimate."""
        return None

    @property
    def model(self) -> NGramModel:
        """The decoded model; raises once unloaded."""
        if self._model is None:
            raise RuntimeError("model has been unloaded")
        return self._model

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
    ) -> tuple[str, int]:
        """Continue ``prompt``; ``max_tokens`` is capped at the model's context length.

        Unloading the handle (at shutdown) ends a generation in progress early.
        """
        return self.model.generate(
            prompt,
            min(max_tokens, self._context_length),
            temperature,
            top_p,
            stop,
            seed,
            cancelled=lambda: self._model is None,
        )

    def unload(self) -> None:
        """Drop the tables."""
        self._model = None


def read_model(path: Path | str) -> NGramModel:
    """Read and decode a model file; raises LoadError naming the file on any problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return NGramModel.from_bytes(data)
    except LoadError as exc:
        raise LoadError(f"{path}: {exc}") from exc


def load(spec: ModelSpec) -> NGramHandle:
    """The ``ngram`` loader."""
    return NGramHandle(read_model(spec.path), spec.context_length)
