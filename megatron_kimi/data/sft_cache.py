"""On-disk token cache for chat SFT data, built once by parallel worker processes.

:func:`build_or_load_cache` tokenizes a jsonl file of conversations (one
``{"messages": [...], ...}`` object per line, see :mod:`megatron_kimi.data.chat`)
into a cache directory ``<cache_root>/<key[:16]>/``:

``tokens.bin``
    all samples' token ids, concatenated, raw ``int32`` (read with ``np.memmap``).
``mask.bin``
    the matching loss mask, raw ``uint8``.
``index.npy``
    ``int64 [num_samples, 2]``: ``(offset, length)`` of each sample in the two files.
``lines.npy``
    ``int64 [num_samples]``: the 1-based jsonl line each sample came from (errors name it).
``meta.jsonl`` / ``meta_offsets.npy``
    one JSON line per sample with its non-``messages`` fields (``{}`` when
    none) and ``int64 [num_samples + 1]`` byte offsets of those lines.
``stats.json``
    samples, tokens, loss tokens, lines, blank lines, malformed lines skipped
    (count plus the first :data:`MAX_REPORTED_ERRORS` line numbers and
    messages), the key and the build settings.  Over-long counts are not known
    here: they depend on the packing capacity (see
    :mod:`megatron_kimi.data.packing`).

The key is the sha256 of :data:`CACHE_VERSION`, a fingerprint of the
tokenizer directory (the bytes of ``tokenizer.json``, ``tokenizer_config.json``,
the chat template files and the other vocabulary files present) and the jsonl
bytes (streamed, never read whole).  Changing the data, the tokenizer or the
tokenization code (bump :data:`CACHE_VERSION`) therefore gives a new directory.

Building: the file is cut into byte ranges on line boundaries; each worker
process loads the tokenizer from its directory path, streams its range line
by line and appends to its own part files, so memory stays bounded whatever
the corpus size.  The parts are concatenated in order into a temporary
directory that is renamed into place atomically, so a cache directory that
exists is complete (it is still validated before use and rebuilt if damaged).
Results do not depend on ``num_workers``.

Malformed lines (bad JSON or UTF-8, missing or ill-typed ``messages``, no
assistant message) raise ``ValueError("{path}:{lineno}: ...")`` with the
1-based line number; with ``on_error="skip"`` they are skipped and counted in
the stats.  Blank lines are skipped silently (and counted).  A cache built with
``on_error="skip"`` that skipped lines still raises for the first of them when
later loaded with ``on_error="raise"``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_kimi.data.chat import parse_record, tokenize_conversation
from megatron_kimi.data.jsonl import decode_line
from megatron_kimi.data.tokenizer import BUILTIN_CHAR_SPEC, CHAR_TOKENIZER_DIRNAME, load_tokenizer

CACHE_VERSION = "sft-cache-v2"
"""Bump whenever tokenization or the cache layout changes: it is part of the key."""

MAX_REPORTED_ERRORS = 100
"""How many skipped malformed lines are listed (with line number and message) in the stats."""

TOKENIZER_FINGERPRINT_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
_EXTRA_TEMPLATES_DIR = "additional_chat_templates"
_HASH_BLOCK = 1 << 20
_CHUNKS_PER_WORKER = 4
_PART_SUFFIXES = (".tokens", ".mask", ".lengths", ".meta", ".lines")
_CACHE_FILES = (
    "tokens.bin",
    "mask.bin",
    "index.npy",
    "lines.npy",
    "meta.jsonl",
    "meta_offsets.npy",
    "stats.json",
)


# --------------------------------------------------------------------------- keys


def hash_file(path: str | Path, h: Any | None = None) -> Any:
    """Stream ``path`` into a sha256 object (created if ``h`` is None) and return it."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 hex digest of the tokenizer files (see :data:`TOKENIZER_FINGERPRINT_FILES`)."""
    d = Path(tokenizer_dir)
    h = hashlib.sha256()
    files = [d / name for name in TOKENIZER_FINGERPRINT_FILES]
    extra = d / _EXTRA_TEMPLATES_DIR
    if extra.is_dir():
        files += sorted(p for p in extra.iterdir() if p.is_file())
    found = False
    for p in files:
        if p.is_file():
            found = True
            h.update(str(p.relative_to(d)).encode() + b"\0")
            h.update(hash_file(p).digest())
    if not found:
        raise ValueError(f"{d}: no tokenizer files found (expected e.g. tokenizer.json)")
    return h.hexdigest()


def cache_key(jsonl_path: str | Path, tokenizer_dir: str | Path) -> str:
    """Cache key: sha256 over the code version, the tokenizer fingerprint and the jsonl bytes."""
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode() + b"\0")
    h.update(tokenizer_fingerprint(tokenizer_dir).encode() + b"\0")
    hash_file(jsonl_path, h)
    return h.hexdigest()


def resolve_tokenizer_dir(tokenizer_dir_or_spec: str | Path, cache_root: str | Path) -> Path:
    """Directory of the tokenizer: ``builtin:char`` is built under ``cache_root`` if needed."""
    if str(tokenizer_dir_or_spec) == BUILTIN_CHAR_SPEC:
        load_tokenizer(BUILTIN_CHAR_SPEC, cache_root)  # builds the directory once
        return Path(cache_root) / CHAR_TOKENIZER_DIRNAME
    path = Path(tokenizer_dir_or_spec)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory does not exist: {path}")
    return path


# --------------------------------------------------------------------------- workers


# Tokenizers loaded in this process, keyed by (directory, fingerprint) so that a
# directory whose files were rewritten is loaded again (forked workers inherit it).
_WORKER_TOKENIZERS: dict[tuple[str, str], Any] = {}


def _worker_tokenizer(tokenizer_dir: str, fingerprint: str) -> Any:
    tok = _WORKER_TOKENIZERS.get((tokenizer_dir, fingerprint))
    if tok is None:
        tok = load_tokenizer(tokenizer_dir, tokenizer_dir)
        _WORKER_TOKENIZERS[(tokenizer_dir, fingerprint)] = tok
    return tok


def _worker_init() -> None:
    # A forked child must not use the parent's tokenizers thread pool; single
    # strings are encoded here, so parallelism inside a worker buys nothing.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@dataclass(frozen=True)
class _Chunk:
    index: int
    jsonl_path: str
    tokenizer_dir: str
    tokenizer_fingerprint: str
    start: int
    end: int
    part_prefix: str
    on_error: str


def _process_line(tokenizer: Any, raw: bytes) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    messages, meta = parse_record(decode_line(raw))
    ids, mask = tokenize_conversation(tokenizer, messages)
    return ids, mask, meta


def _tokenize_chunk(chunk: _Chunk) -> dict[str, Any]:
    """Tokenize lines in ``[start, end)`` into part files; line numbers are chunk-relative.

    Stops at the first malformed line when ``on_error == "raise"`` and reports it.
    """
    tokenizer = _worker_tokenizer(chunk.tokenizer_dir, chunk.tokenizer_fingerprint)
    out: dict[str, Any] = {
        "index": chunk.index,
        "lines": 0,
        "blank": 0,
        "samples": 0,
        "tokens": 0,
        "loss_tokens": 0,
        "skipped": 0,
        "skipped_list": [],  # (relative lineno, message), capped
        "error": None,  # (relative lineno, message) when on_error == "raise"
    }
    p = chunk.part_prefix
    with open(chunk.jsonl_path, "rb") as src, open(p + ".tokens", "wb") as ft, open(
        p + ".mask", "wb"
    ) as fm, open(p + ".lengths", "wb") as fl, open(p + ".meta", "wb") as fmeta, open(
        p + ".lines", "wb"
    ) as flines:
        src.seek(chunk.start)
        pos = chunk.start
        while pos < chunk.end:
            raw = src.readline()
            if not raw:
                break
            pos += len(raw)
            out["lines"] += 1
            if not raw.strip():
                out["blank"] += 1
                continue
            try:
                ids, mask, meta = _process_line(tokenizer, raw)
            except ValueError as e:
                if chunk.on_error == "raise":
                    out["error"] = (out["lines"], str(e))
                    break
                out["skipped"] += 1
                if len(out["skipped_list"]) < MAX_REPORTED_ERRORS:
                    out["skipped_list"].append((out["lines"], str(e)))
                continue
            ft.write(ids.tobytes())
            fm.write(mask.tobytes())
            fl.write(np.int64(len(ids)).tobytes())
            flines.write(np.int64(out["lines"]).tobytes())
            fmeta.write(json.dumps(meta, ensure_ascii=False).encode("utf-8") + b"\n")
            out["samples"] += 1
            out["tokens"] += int(len(ids))
            out["loss_tokens"] += int(mask.sum())
    return out


def _line_aligned_chunks(path: Path, num_chunks: int) -> list[tuple[int, int]]:
    """Split ``path`` into at most ``num_chunks`` byte ranges that start at line starts."""
    size = path.stat().st_size
    if size == 0:
        return []
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, num_chunks):
            nominal = size * k // num_chunks
            if nominal <= bounds[-1]:
                continue
            f.seek(nominal - 1)
            f.readline()  # finish the line that contains byte nominal - 1
            b = f.tell()
            if bounds[-1] < b < size:
                bounds.append(b)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


# --------------------------------------------------------------------------- cache


def _default_mp_context() -> str:
    # fork avoids re-importing transformers in every worker (seconds each);
    # elsewhere (macOS, Windows) spawn is the safe choice.
    return "fork" if sys.platform.startswith("linux") else "spawn"


class SFTCache:
    """Read access to a built cache directory (memory-mapped; picklable)."""

    def __init__(self, path: str | Path, built: bool = False) -> None:
        self.path = Path(path)
        self.built = built  # True when this call built the cache, False when it was reused
        with open(self.path / "stats.json", encoding="utf-8") as f:
            self.stats: dict[str, Any] = json.load(f)
        self.index = np.load(self.path / "index.npy")
        self.lengths: np.ndarray = np.ascontiguousarray(self.index[:, 1], dtype=np.int64)
        self._meta_offsets = np.load(self.path / "meta_offsets.npy")
        self.source_lines: np.ndarray = np.load(self.path / "lines.npy")
        self.source = str(self.stats.get("jsonl", self.path))  # the jsonl path (set again by build_or_load_cache)
        self._tokens: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    @property
    def key(self) -> str:
        return str(self.stats["key"])

    def __len__(self) -> int:
        return int(len(self.index))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = state["_mask"] = None  # reopened lazily in the new process
        return state

    def _open(self) -> None:
        n_tok = int(self.stats["tokens"])
        if n_tok == 0:
            self._tokens = np.zeros(0, dtype=np.int32)
            self._mask = np.zeros(0, dtype=np.uint8)
        else:
            shape = (n_tok,)
            self._tokens = np.memmap(self.path / "tokens.bin", np.int32, mode="r", shape=shape)
            self._mask = np.memmap(self.path / "mask.bin", np.uint8, mode="r", shape=shape)

    def _check(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range [0, {n})")
        return i % n

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32, loss_mask uint8)`` of sample ``i`` (read-only memmap views)."""
        i = self._check(int(i))
        if self._tokens is None:
            self._open()
        off, length = (int(x) for x in self.index[i])
        return self._tokens[off : off + length], self._mask[off : off + length]

    def meta(self, i: int) -> dict[str, Any]:
        """The sample's metadata: the source record without ``messages`` (``{}`` if none)."""
        i = self._check(int(i))
        start, end = int(self._meta_offsets[i]), int(self._meta_offsets[i + 1])
        with open(self.path / "meta.jsonl", "rb") as f:
            f.seek(start)
            return json.loads(f.read(end - start))


def _is_complete(path: Path) -> bool:
    try:
        if not all((path / name).is_file() for name in _CACHE_FILES):
            return False
        stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
        n, n_tok = int(stats["samples"]), int(stats["tokens"])
        index = np.load(path / "index.npy", mmap_mode="r")
        meta_offsets = np.load(path / "meta_offsets.npy", mmap_mode="r")
        src_lines = np.load(path / "lines.npy", mmap_mode="r")
        return (
            stats.get("version") == CACHE_VERSION
            and index.shape == (n, 2)
            and src_lines.shape == (n,)
            and meta_offsets.shape == (n + 1,)
            and (path / "tokens.bin").stat().st_size == 4 * n_tok
            and (path / "mask.bin").stat().st_size == n_tok
            and (path / "meta.jsonl").stat().st_size == int(meta_offsets[-1])
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return False


def _raise_first_skipped(jsonl_path: Path, stats: dict[str, Any]) -> None:
    if stats.get("malformed_skipped", 0):
        first = stats["malformed_lines"][0]
        raise ValueError(f"{jsonl_path}:{first['line']}: {first['error']}")


def _assemble(tmp: Path, parts: list[str], results: list[dict[str, Any]]) -> tuple[int, int]:
    """Concatenate part files (in order) into the cache files; return (samples, tokens)."""
    n = sum(r["samples"] for r in results)
    if n == 0:  # numpy cannot memory-map an empty array
        np.save(tmp / "index.npy", np.zeros((0, 2), dtype=np.int64))
        np.save(tmp / "lines.npy", np.zeros(0, dtype=np.int64))
        np.save(tmp / "meta_offsets.npy", np.zeros(1, dtype=np.int64))
        for name in ("tokens.bin", "mask.bin", "meta.jsonl"):
            (tmp / name).touch()
        for prefix in parts:
            for suffix in _PART_SUFFIXES:
                os.remove(prefix + suffix)
        return 0, 0
    index = np.lib.format.open_memmap(tmp / "index.npy", mode="w+", dtype=np.int64, shape=(n, 2))
    src_lines = np.lib.format.open_memmap(tmp / "lines.npy", mode="w+", dtype=np.int64, shape=(n,))
    meta_offsets = np.lib.format.open_memmap(
        tmp / "meta_offsets.npy", mode="w+", dtype=np.int64, shape=(n + 1,)
    )
    row, tok_off, meta_off = 0, 0, 0
    meta_offsets[0] = 0
    with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm, open(
        tmp / "meta.jsonl", "wb"
    ) as fmeta:
        for prefix, res in zip(parts, results):
            lengths = np.fromfile(prefix + ".lengths", dtype=np.int64)
            k = len(lengths)
            src_lines[row : row + k] = np.fromfile(prefix + ".lines", dtype=np.int64) + res["line_offset"]
            if k:
                ends = tok_off + np.cumsum(lengths)
                index[row : row + k, 0] = ends - lengths
                index[row : row + k, 1] = lengths
                tok_off = int(ends[-1])
            for suffix, dst in ((".tokens", ft), (".mask", fm)):
                with open(prefix + suffix, "rb") as src:
                    shutil.copyfileobj(src, dst, _HASH_BLOCK)
            with open(prefix + ".meta", "rb") as src:
                for j, line in enumerate(src):
                    meta_off += len(line)
                    meta_offsets[row + j + 1] = meta_off
                    fmeta.write(line)
            row += k
            for suffix in _PART_SUFFIXES:
                os.remove(prefix + suffix)
    index.flush()
    meta_offsets.flush()
    src_lines.flush()
    del index, meta_offsets, src_lines
    return n, tok_off


def _build(
    jsonl_path: Path,
    tokenizer_dir: Path,
    cache_root: Path,
    key: str,
    num_workers: int,
    on_error: str,
    mp_context: str | None,
) -> Path:
    # Fail fast (in this process, with a clear error) if the tokenizer cannot be loaded.
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    _worker_tokenizer(str(tokenizer_dir), fingerprint)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=cache_root))
    try:
        n_chunks = 1 if num_workers <= 1 else num_workers * _CHUNKS_PER_WORKER
        ranges = _line_aligned_chunks(jsonl_path, n_chunks)
        parts = [str(tmp / f"part-{k:05d}") for k in range(len(ranges))]
        chunks = [
            _Chunk(k, str(jsonl_path), str(tokenizer_dir), fingerprint, s, e, parts[k], on_error)
            for k, (s, e) in enumerate(ranges)
        ]
        results: list[dict[str, Any]] = []
        lines_before = 0

        def consume(res: dict[str, Any]) -> None:
            nonlocal lines_before
            if res["error"] is not None:
                rel, msg = res["error"]
                raise ValueError(f"{jsonl_path}:{lines_before + rel}: {msg}")
            res["skipped_list"] = [(lines_before + rel, msg) for rel, msg in res["skipped_list"]]
            res["line_offset"] = lines_before
            lines_before += res["lines"]
            results.append(res)

        if num_workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                consume(_tokenize_chunk(c))
        else:
            ctx = mp.get_context(mp_context or _default_mp_context())
            with ctx.Pool(min(num_workers, len(chunks)), initializer=_worker_init) as pool:
                # imap keeps file order: when chunk k reports an error, chunks < k
                # are complete, so the global line number is known; leaving the
                # ``with`` terminates the remaining work.
                for res in pool.imap(_tokenize_chunk, chunks):
                    consume(res)

        n, n_tok = _assemble(tmp, parts, results)
        skipped = [
            {"line": line, "error": msg} for r in results for line, msg in r["skipped_list"]
        ][:MAX_REPORTED_ERRORS]
        lengths = np.load(tmp / "index.npy", mmap_mode="r")[:, 1] if n else np.zeros(0)
        stats = {
            "version": CACHE_VERSION,
            "key": key,
            "jsonl": str(jsonl_path),
            "tokenizer_dir": str(tokenizer_dir),
            "samples": n,
            "tokens": n_tok,
            "loss_tokens": sum(r["loss_tokens"] for r in results),
            "lines": lines_before,
            "blank_lines": sum(r["blank"] for r in results),
            "malformed_skipped": sum(r["skipped"] for r in results),
            "malformed_lines": skipped,
            "max_length": int(lengths.max()) if n else 0,
            "mean_length": float(lengths.mean()) if n else 0.0,
            "on_error": on_error,
            "num_workers": num_workers,
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        del lengths
        with open(tmp / "stats.json", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        final = cache_root / key[:16]
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else finished the same build first: use theirs.
            if not _is_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_or_load_cache(
    jsonl_path: str | Path,
    tokenizer_dir_or_spec: str | Path,
    cache_root: str | Path,
    num_workers: int = 2,
    on_error: str = "raise",
    mp_context: str | None = None,
) -> SFTCache:
    """Return the token cache of ``jsonl_path``, building it first if needed.

    ``tokenizer_dir_or_spec`` is a tokenizer directory or ``"builtin:char"``
    (built under ``cache_root``).  ``num_workers`` worker processes tokenize
    (``<= 1``: in this process).  ``on_error`` is ``"raise"`` or ``"skip"``
    for malformed lines.  ``mp_context`` is the multiprocessing start method
    (default ``fork`` on Linux, else ``spawn``).  The result's ``built`` is
    True when this call built the cache.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    jsonl = Path(jsonl_path)
    if not jsonl.is_file():
        raise ValueError(f"{jsonl}: file does not exist")
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = resolve_tokenizer_dir(tokenizer_dir_or_spec, root)
    key = cache_key(jsonl, tok_dir)
    final = root / key[:16]
    built = False
    if not _is_complete(final):
        if final.exists():
            shutil.rmtree(final)  # damaged or from an older layout
        final = _build(jsonl, tok_dir, root, key, num_workers, on_error, mp_context)
        built = True
    cache = SFTCache(final, built=built)
    cache.source = str(jsonl)  # the same bytes may have been cached from another path
    if cache.stats.get("key") != key:
        raise ValueError(f"{final}: cache key mismatch (16-hex-digit prefix collision?)")
    if on_error == "raise":
        _raise_first_skipped(jsonl, cache.stats)
    return cache
