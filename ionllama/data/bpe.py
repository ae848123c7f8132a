"""BPE baseline data: a byte-level BPE tokenizer trained on the *train* split only, uint16 token shards
built from exactly the documents of the byte shards, token batches, and exact bits per byte.

Byte exactness is the point of this module: every token maps to a fixed byte string (``token_bytes``),
the document separator DOC_SEP (0x00) is the single-byte token of byte 0, and bytes that are not valid
UTF-8 are encoded as their single-byte tokens. So the token stream of a byte shard decodes back to the
shard byte for byte, and the byte lengths of its tokens sum to the shard's length (checked when the
shards are built). A token model's BPB = total bits over scored tokens / the bytes those tokens cover.

Token shards live next to the byte shards: ``<byte shard dir>/bpe<V>-<key>/{tokenizer.json, train.tok,
val.tok, meta.json}``; the key hashes the byte shards' checksums and the tokenizer settings, so a
second run reuses them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import UserError
from . import DOC_SEP
from .loader import checked_task_rows

TOKEN_FORMAT = 1
TOKEN_DTYPE = np.uint16
LN2 = math.log(2.0)
IGNORE_INDEX = -100
_SURROGATES = re.compile("[\udc80-\udcff]+")
_ENCODE_BATCH_BYTES = 16 << 20  # encode this many bytes of documents per call (bounds memory)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of ByteLevel BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("the BPE baseline needs the `tokenizers` package; pip install 'ionllama[data]'") from None
    return tokenizers


class ByteBPE:
    """A HF `tokenizers` byte-level BPE with an exact token -> bytes table."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        inv = {c: b for b, c in byte_to_unicode().items()}
        vocab = tokenizer.get_vocab()
        self.vocab_size = max(vocab.values()) + 1
        table: list[bytes | None] = [None] * self.vocab_size
        for s, i in vocab.items():
            try:
                table[i] = bytes(inv[c] for c in s)
            except KeyError:
                raise UserError(f"token {s!r} of the tokenizer is not byte-level; train it with `ionllama.data.bpe`") from None
        missing = [i for i, t in enumerate(table) if t is None]
        if missing:
            raise UserError(f"tokenizer ids {missing[:5]} have no token; the tokenizer file is damaged")
        self.token_bytes: list[bytes] = table  # type: ignore[assignment]
        self.token_nbytes = np.array([len(t) for t in table], dtype=np.int64)
        single = {t[0]: i for i, t in enumerate(table) if len(t) == 1}
        if len(single) != 256:
            raise UserError("the tokenizer lacks some of the 256 single-byte tokens; train it with the full alphabet")
        self.byte_ids = np.array([single[b] for b in range(256)], dtype=np.int64)
        self.sep_id = int(self.byte_ids[DOC_SEP])
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    # ------------------------------------------------------------------ io
    @classmethod
    def from_str(cls, text: str) -> "ByteBPE":
        tok = _import_tokenizers()
        try:
            return cls(tok.Tokenizer.from_str(text))
        except Exception as e:  # tokenizers raises its own exception type for bad JSON
            raise UserError(f"cannot read the tokenizer ({type(e).__name__}: {str(e)[:120]}); retrain it") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ByteBPE":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"tokenizer {p} not found; train one with `ionllama.data.bpe.train_tokenizer`")
        return cls.from_str(p.read_text(encoding="utf-8"))

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_str(), encoding="utf-8")
        os.replace(tmp, p)
        return p

    # ------------------------------------------------------------------ encode / decode
    def _segments(self, doc: bytes) -> list[tuple[str | None, bytes]]:
        """A separator-free byte string -> [(text, b'') | (None, raw invalid bytes)]."""
        try:
            return [(doc.decode("utf-8"), b"")]
        except UnicodeDecodeError:
            pass
        s = doc.decode("utf-8", "surrogateescape")
        out, pos = [], 0
        for m in _SURROGATES.finditer(s):
            if m.start() > pos:
                out.append((s[pos:m.start()], b""))
            out.append((None, bytes(ord(c) - 0xDC00 for c in m.group())))
            pos = m.end()
        if pos < len(s):
            out.append((s[pos:], b""))
        return out

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        """Separator-free documents -> token ids (int64 arrays), exact byte for byte."""
        plan = [self._segments(d) for d in docs]
        texts = [t for segs in plan for t, _ in segs if t is not None]
        encoded = iter(self._encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        out = []
        for segs in plan:
            parts = []
            for t, raw in segs:
                if t is not None:
                    parts.append(np.asarray(next(encoded).ids, dtype=np.int64))
                else:
                    parts.append(self.byte_ids[np.frombuffer(raw, dtype=np.uint8)])
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
        return out

    def encode(self, data: bytes | bytearray | np.ndarray) -> np.ndarray:
        """Any bytes (DOC_SEP marks documents) -> token ids; DOC_SEP becomes the separator token."""
        raw = bytes(data) if not isinstance(data, np.ndarray) else np.asarray(data, dtype=np.uint8).tobytes()
        pieces = raw.split(bytes([DOC_SEP]))
        docs = self.encode_docs([p for p in pieces if p])
        out, k = [], 0
        for i, p in enumerate(pieces):
            if i:
                out.append(np.array([self.sep_id], dtype=np.int64))
            if p:
                out.append(docs[k])
                k += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> bytes:
        tb = self.token_bytes
        return b"".join(tb[int(i)] for i in ids)

    def n_bytes(self, ids: np.ndarray) -> int:
        return int(self.token_nbytes[np.asarray(ids, dtype=np.int64)].sum())


# ---------------------------------------------------------------------- training


def iter_shard_docs(data: np.ndarray, chunk: int = 1 << 24) -> Iterator[bytes]:
    """Documents of a byte shard (split on DOC_SEP), read in chunks so a large memmap is never copied whole."""
    carry = b""
    for s in range(0, len(data), chunk):
        buf = carry + np.asarray(data[s:s + chunk], dtype=np.uint8).tobytes()
        parts = buf.split(bytes([DOC_SEP]))
        carry = parts.pop()
        for p in parts:
            if p:
                yield p
    if carry:
        yield carry


def train_tokenizer(docs: Iterable[bytes], vocab_size: int = 4096) -> ByteBPE:
    """Byte-level BPE (GPT-2 pre-tokenizer, all 256 bytes in the alphabet) trained on `docs`."""
    tk = _import_tokenizers()
    if not 256 < vocab_size <= np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(f"--vocab_size {vocab_size} must be in 257..65536 (uint16 token shards)")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False, special_tokens=[])

    def texts():
        for d in docs:
            yield d.decode("utf-8", "replace")  # training only counts pieces; encoding stays exact

    tok.train_from_iterator(texts(), trainer=trainer)
    return ByteBPE(tok)


# ---------------------------------------------------------------------- token shards


@dataclass
class TokenShards:
    path: Path
    meta: dict
    bpe: ByteBPE
    train: np.ndarray
    val: np.ndarray

    @property
    def bytes_per_token(self) -> float:
        return float(self.meta["splits"]["train"]["bytes_per_token"])


def _token_key(byte_meta: dict, vocab_size: int, tokenizer_bytes: int | None, tokenizer_sha: str | None) -> dict:
    return {"format": TOKEN_FORMAT, "vocab_size": vocab_size, "tokenizer_train_bytes": tokenizer_bytes,
            "tokenizer_sha": tokenizer_sha,
            "byte_shards": {s: byte_meta["splits"][s]["sha256"] for s in ("train", "val")}}


def token_dir_for(byte_dir: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(byte_dir) / f"bpe{key['vocab_size']}-{digest}"


def _limited(docs: Iterable[bytes], max_bytes: int | None) -> Iterator[bytes]:
    total = 0
    for d in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(d)
        yield d


def _write_tokens(bpe: ByteBPE, data: np.ndarray, path: Path) -> dict:
    n_tok = n_bytes = n_docs = 0
    with open(path, "wb") as f:
        batch, size = [], 0

        def flush():
            nonlocal n_tok, n_bytes, n_docs
            for ids in bpe.encode_docs(batch):
                row = np.concatenate([[bpe.sep_id], ids]).astype(TOKEN_DTYPE)
                f.write(row.tobytes())
                n_tok += len(row)
                n_bytes += int(bpe.token_nbytes[row.astype(np.int64)].sum())
            n_docs += len(batch)
            batch.clear()

        for doc in iter_shard_docs(data):
            batch.append(doc)
            size += len(doc)
            if size >= _ENCODE_BATCH_BYTES:
                flush()
                size = 0
        if batch:
            flush()
    return {"tokens": n_tok, "bytes": n_bytes, "documents": n_docs, "bytes_per_token": n_bytes / max(n_tok, 1)}


def _find_same_tokenizer(byte_dir: Path, bpe: ByteBPE, byte_meta: dict) -> Path | None:
    text = bpe.to_str()
    want = {s: byte_meta["splits"][s]["sha256"] for s in ("train", "val")}
    for d in sorted(Path(byte_dir).glob(f"bpe{bpe.vocab_size}-*")):
        try:
            meta = json.loads((d / "meta.json").read_text())
            if (meta["key"]["byte_shards"] == want and _token_shards_whole(d, meta)
                    and (d / "tokenizer.json").read_text(encoding="utf-8") == text):
                return d
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def prepare_tokens(byte_dir: str | Path, vocab_size: int = 4096, tokenizer_train_bytes: int | None = None,
                   tokenizer_path: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Token shards for the byte shards in `byte_dir` (built once, then reused). The tokenizer is trained
    on the train split only (its first `tokenizer_train_bytes` bytes when given), or read from
    `tokenizer_path` (e.g. the one saved with a run, so a resumed run keeps its exact tokenizer)."""
    from .shards import cache_lock, open_shards, staged_dir

    byte_dir = Path(byte_dir)
    shards = open_shards(byte_dir)
    given = ByteBPE.from_file(tokenizer_path) if tokenizer_path else None
    sha = hashlib.sha256(given.to_str().encode()).hexdigest() if given else None
    if given is not None:
        vocab_size = given.vocab_size
    key = _token_key(shards.meta, vocab_size, None if given else tokenizer_train_bytes, sha)
    out = token_dir_for(byte_dir, key)
    if given is not None and not (out / "meta.json").exists():
        same = _find_same_tokenizer(byte_dir, given, shards.meta)
        if same is not None:  # e.g. a resumed run: its tokenizer is the one trained here before
            log(f"bpe: reusing {same} (same tokenizer)")
            return same
    if _token_cache_made(out, key, log):
        return out
    # one process builds it at a time; the others wait and then reuse it (cache_lock)
    with cache_lock(byte_dir, out.name, "--data_dir"):
        if _token_cache_made(out, key, lambda m: None if "preparing it again" in m else log(m)):  # said once
            return out
        with staged_dir(out, byte_dir, "--data_dir") as tmp:
            t0 = time.time()
            if given is None:
                log(f"bpe: training a {vocab_size}-token byte-level BPE on the train split"
                    + (f" (first {tokenizer_train_bytes:,} bytes)" if tokenizer_train_bytes else ""))
                bpe = train_tokenizer(_limited(iter_shard_docs(shards.train), tokenizer_train_bytes), vocab_size)
            else:
                bpe = given
            bpe.save(tmp / "tokenizer.json")
            t1 = time.time()
            splits = {}
            for name, data in (("train", shards.train), ("val", shards.val)):
                splits[name] = _write_tokens(bpe, data, tmp / f"{name}.tok")
                if splits[name]["bytes"] != len(data):  # the invariant every BPB number rests on
                    raise RuntimeError(f"token shard {name}: tokens cover {splits[name]['bytes']} bytes, the byte "
                                       f"shard has {len(data)}")
            meta = {"format": TOKEN_FORMAT, "key": key, "vocab_size": bpe.vocab_size, "splits": splits,
                    "byte_dir": str(byte_dir), "tokenizer_seconds": round(t1 - t0, 2),
                    "encode_seconds": round(time.time() - t1, 2), "tokenizers": _import_tokenizers().__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    s = meta["splits"]
    log(f"bpe: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, "
        f"{s['train']['bytes_per_token']:.3f} bytes/token (tokenizer {meta['tokenizer_seconds']} s, "
        f"encoding {meta['encode_seconds']} s) -> {out}")
    return out


def _token_shards_whole(d: Path, meta: dict) -> bool:
    """Whether `d`'s token shards hold the tokens its meta.json records (the byte shards' check, _reusable)."""
    size = np.dtype(TOKEN_DTYPE).itemsize
    return all((d / f"{sp}.tok").is_file() and (d / f"{sp}.tok").stat().st_size == meta["splits"][sp]["tokens"] * size
               for sp in ("train", "val"))


def _token_cache_made(out: Path, key: dict, log) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("key") != key:
            return False
        whole = _token_shards_whole(out, meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if not whole:  # a cut-short .tok was reused silently: trained on, and val BPB scored over fewer bytes
        log(f"bpe: {out} has a token shard whose size is not the one meta.json records; preparing it again")
        return False
    log(f"bpe: reusing {out}")
    return True


def open_token_shards(path: str | Path) -> TokenShards:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        train = np.memmap(path / "train.tok", dtype=TOKEN_DTYPE, mode="r")
        val = np.memmap(path / "val.tok", dtype=TOKEN_DTYPE, mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"token cache {path} is incomplete ({e}); delete it and run again") from None
    return TokenShards(path, meta, ByteBPE.from_file(path / "tokenizer.json"), train, val)


# ---------------------------------------------------------------------- batches


class TokenWindowSampler:
    """Random windows of seq_len + 1 tokens; a pure function of (seed, step, micro-step, rank), like the
    byte WindowSampler. With task_mix, the last rows are packed task examples in tokens."""

    def __init__(self, tokens: np.ndarray, bpe: ByteBPE, seq_len: int, batch_size: int, grad_accum: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1, task_mix: float = 0.0):
        if len(tokens) < seq_len + 2:
            raise UserError(f"the train split has {len(tokens):,} tokens, fewer than --seq_len {seq_len} + 2; "
                            "lower --seq_len or add data")
        self.tokens, self.bpe, self.seq_len, self.batch_size = tokens, bpe, seq_len, batch_size
        self.grad_accum, self.seed, self.rank, self.world_size = grad_accum, seed, rank, world_size
        # the byte sampler's rule: 0..1, at least one whole row (ionllama.data.loader)
        self.n_task_rows, self.task_note = checked_task_rows(task_mix, batch_size)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        k = micro * self.world_size + self.rank
        rng = np.random.default_rng([self.seed, step])
        offs = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)
        offs = offs[k * self.batch_size:(k + 1) * self.batch_size]
        w = torch.from_numpy(np.asarray(self.tokens[offs[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64))
        x, y = w[:, :-1].clone(), w[:, 1:].clone()
        if self.n_task_rows:
            trng = np.random.default_rng([self.seed, step, k, 0x7A5C])
            tx, ty = make_token_task_batch(self.bpe, trng, self.n_task_rows, self.seq_len, "train")
            x[-self.n_task_rows:], y[-self.n_task_rows:] = tx, ty
        return x, y


def make_token_task_batch(bpe: ByteBPE, rng: np.random.Generator, batch_size: int, seq_len: int,
                          split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The byte task batches of ionllama.data.tasks in tokens: DOC_SEP prompt answer\\n DOC_SEP ...
    Prompt and answer are encoded separately (as at generation time, where the prompt is encoded alone),
    targets only on the answer tokens and the closing newline."""
    from . import tasks as T

    L = seq_len + 1
    toks = np.full((batch_size, L), bpe.sep_id, dtype=np.int64)
    mask = np.zeros((batch_size, L), dtype=bool)
    for r in range(batch_size):
        pos = 1
        while True:
            ex = T.sample_example(rng, T.TASKS[int(rng.integers(len(T.TASKS)))], split)
            p_ids, a_ids = bpe.encode_docs([ex.prompt, ex.answer + b"\n"])
            n = len(p_ids) + len(a_ids)
            if pos + n + 1 > L:
                if pos == 1:
                    raise UserError(f"seq_len {seq_len} tokens is too short for one task example; use --seq_len 64+")
                break
            toks[r, pos:pos + len(p_ids)] = p_ids
            toks[r, pos + len(p_ids):pos + n] = a_ids
            mask[r, pos + len(p_ids):pos + n] = True
            pos += n + 1
    x = torch.from_numpy(toks[:, :-1].copy())
    y = torch.from_numpy(np.where(mask[:, 1:], toks[:, 1:], IGNORE_INDEX))
    return x, y


# ---------------------------------------------------------------------- exact evaluation


@torch.no_grad()
def evaluate_token_bpb(model, tokens: np.ndarray, seq_len: int, batch_size: int, device,
                       amp_dtype: torch.dtype | None = None, token_nbytes: np.ndarray | None = None) -> dict:
    """Bits per byte of a token model over a token array, every token after the first scored exactly
    once (non-overlapping windows of seq_len + 1 tokens sharing a boundary token, as the byte evaluator).
    bpb = total bits / bytes covered by the scored tokens; for a shard starting with DOC_SEP these are
    exactly the bytes a byte model scores (all but the first)."""
    device = torch.device(device)
    nb = torch.as_tensor(token_nbytes if token_nbytes is not None else model.token_nbytes.cpu().numpy(),
                         dtype=torch.float64)
    n = len(tokens)
    if n < 2:
        raise UserError(f"evaluation data has {n} token(s); it needs at least 2")
    scored = n - 1
    n_full, tail = divmod(scored, seq_len)
    bits = 0.0
    n_bytes = 0
    n_tok = 0
    ctx = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def run(w: torch.Tensor):
        nonlocal bits, n_bytes, n_tok
        x, y = w[:, :-1].to(device), w[:, 1:]
        with ctx:
            logits = model(x)["logits"]
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                                reduction="sum")
        bits += float(nll) / LN2
        n_bytes += int(nb[y].sum())
        n_tok += y.numel()

    from ..model.common import eval_mode  # here: the model package imports this module

    with eval_mode(model):  # each part's own mode back after, not only the top module's
        for i in range(0, n_full, batch_size):
            starts = np.arange(i, min(i + batch_size, n_full)) * seq_len
            run(torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)))
        if tail:
            s = n_full * seq_len
            run(torch.from_numpy(np.asarray(tokens[s:s + tail + 1], dtype=np.int64))[None])
    loss = bits * LN2 / n_bytes
    return {"loss": loss, "bpb": bits / n_bytes, "ppl": math.exp(min(loss, 50.0)), "bytes": n_bytes,
            "tokens": n_tok, "bytes_per_token": n_bytes / n_tok, "bits": bits}


# ---------------------------------------------------------------------- the trainer's view


DEFAULT_VOCAB = 4096


def is_token_model(model_name: str) -> bool:
    """True for registered models that read token ids instead of bytes (class attribute token_level)."""
    from ..registry import _REGISTRY, _ensure_loaded

    _ensure_loaded()
    return bool(getattr(_REGISTRY.get(model_name), "token_level", False))


def configure(config):
    """A token model left at the byte vocabulary (256) gets the default BPE vocabulary."""
    import dataclasses

    if is_token_model(config.model) and config.vocab_size <= 256:
        return dataclasses.replace(config, vocab_size=DEFAULT_VOCAB)
    return config


def token_prefix_for_bytes(tokens: np.ndarray, token_nbytes: np.ndarray, max_bytes: int | None) -> np.ndarray:
    """The leading tokens that cover at most the first max_bytes + 1 bytes (what the byte evaluator reads
    for a cap of max_bytes scored bytes)."""
    if max_bytes is None:
        return tokens
    ends = np.cumsum(token_nbytes[np.asarray(tokens, dtype=np.int64)])
    k = int(np.searchsorted(ends, int(max_bytes) + 1, side="right"))
    if k < 2 <= len(tokens):  # two tokens would score bytes past the cap (max_bytes 1 scored 3)
        raise UserError(f"a cap of {max_bytes} scored byte(s) holds no whole token after the first (a cap of "
                        f"{int(ends[1]) - 1} would); raise the cap (--eval_bytes; --max_eval_bytes in ionllama bench)")
    return tokens[:k]


class TokenTraining:
    """Everything the trainer needs to train a token model from prepared byte shards: the token shards
    (tokenizer trained on the train split, or the one a resumed checkpoint carries), the train sampler,
    the val tokens and the exact evaluator. ``--seq_len`` counts tokens for a token model."""

    def __init__(self, byte_dir: str | Path, vocab_size: int, seq_len: int, batch_size: int, grad_accum: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1, task_mix: float = 0.0,
                 tokenizer_json: str | None = None, run_dir: str | Path | None = None,
                 log: Callable[[str], None] = print):
        checked_task_rows(task_mix, batch_size)  # a bad --task_mix is refused before the tokenizer is trained
        tok_path = None
        if tokenizer_json:
            tok_path = Path(byte_dir) / f".tokenizer-{hashlib.sha256(tokenizer_json.encode()).hexdigest()[:12]}.json"
            # atomically, and again where a copy is cut short: a half-written file (an interrupted run, or another
            # rank of a resumed DDP run reading it mid-write) failed every later resume
            if not tok_path.is_file() or tok_path.read_bytes() != tokenizer_json.encode("utf-8"):
                from ..fsutil import atomic_write

                atomic_write(tok_path, tokenizer_json)
        path = prepare_tokens(byte_dir, vocab_size, tokenizer_path=tok_path, log=log)
        self.shards = open_token_shards(path)
        self.bpe = self.shards.bpe
        if self.bpe.vocab_size != vocab_size:
            if tokenizer_json:  # a resumed run: its checkpoint carries the tokenizer
                raise UserError(f"the checkpoint's tokenizer has {self.bpe.vocab_size} tokens, the model vocab_size "
                                f"is {vocab_size}; resume with the same --vocab_size")
            # a new tokenizer stops growing when the train split has no more pairs to merge
            raise UserError(f"the train split yields a tokenizer of only {self.bpe.vocab_size} tokens, not the "
                            f"{vocab_size} of --vocab_size; pass --vocab_size {self.bpe.vocab_size} or less, or "
                            "train on more text")
        self.train, self.val = self.shards.train, self.shards.val
        self.bytes_per_token = self.shards.bytes_per_token
        self.sampler = TokenWindowSampler(self.train, self.bpe, seq_len, batch_size, grad_accum, seed, rank,
                                          world_size, task_mix)
        if run_dir is not None:  # next to the checkpoints, where the benchmark looks for it
            self.bpe.save(Path(run_dir) / "tokenizer.json")

    @classmethod
    def for_trainer(cls, trainer, byte_dir: str | Path, log: Callable[[str], None] = print) -> "TokenTraining":
        """The trainer's hook (ionllama/train/trainer.py): its args, config, ranks, run folder and, when
        resuming, the tokenizer its checkpoint carries; also adds the token facts to its data_meta."""
        a = trainer.args
        tok_json = None
        state = (trainer.ck or {}).get("model") if getattr(trainer, "ck", None) else None
        if isinstance(state, dict) and "tokenizer_json" in state and state["tokenizer_json"].numel():
            tok_json = bytes(state["tokenizer_json"].cpu().numpy()).decode("utf-8")
        td = cls(byte_dir, trainer.config.vocab_size, a.seq_len, a.batch_size, a.grad_accum, a.seed, trainer.rank,
                 trainer.world_size, a.task_mix, tokenizer_json=tok_json,
                 run_dir=trainer.run_dir if trainer.is_main else None, log=log)
        trainer.data_meta.update(td.meta)
        return td

    @property
    def meta(self) -> dict:
        s = self.shards.meta["splits"]
        return {"token_dir": str(self.shards.path), "vocab_size": self.bpe.vocab_size,
                "bytes_per_token": self.bytes_per_token, "train_tokens": s["train"]["tokens"],
                "val_tokens": s["val"]["tokens"]}

    def attach(self, model) -> None:
        model.set_tokenizer(self.bpe)

    def evaluate(self, model, seq_len: int, batch_size: int, device, max_bytes: int | None = None,
                 amp_dtype: torch.dtype | None = None) -> dict:
        """The byte evaluator's result keys; bytes_per_patch is bytes per token."""
        toks = token_prefix_for_bytes(self.val, self.bpe.token_nbytes, max_bytes)
        r = evaluate_token_bpb(model, toks, seq_len, batch_size, device, amp_dtype, self.bpe.token_nbytes)
        return {"loss": r["loss"], "bpb": r["bpb"], "ppl": r["ppl"], "bytes": r["bytes"],
                "bytes_per_patch": r["bytes_per_token"], "tokens": r["tokens"]}
