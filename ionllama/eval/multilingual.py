"""Per-language BPB and bytes/patch, and for parallel text (the same content in every language, like
the UDHR set) the total bits each language needs, next to the token count of a byte-level BPE."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .lm import evaluate_bpb

LANG_SUFFIXES = (".txt", ".md", ".c", ".h", ".js", ".py")


def language_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in LANG_SUFFIXES)
    if not files:
        raise UserError(f"no language files (*.txt) in '{directory}'; --multilingual_dir needs one file per language")
    return files


# ------------------------------------------------------------------ BPE baseline token counts


def load_bpe(checkpoint_path: Path | None):
    """tokenizer.json next to the checkpoint (the BPE baseline trained on the training split), or None."""
    if checkpoint_path is None:
        return None, None
    p = checkpoint_path.parent / "tokenizer.json"
    if not p.is_file():
        return None, None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(p))
    return tok, {"source": "checkpoint dir", "path": str(p), "vocab_size": tok.get_vocab_size()}


def train_bpe_on(data: np.ndarray, vocab_size: int = 4096, max_bytes: int = 4_000_000):
    """A small byte-level BPE trained on the eval data, only for counting tokens; flagged as such."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = bytes(np.asarray(data[:max_bytes], dtype=np.uint8)).decode("utf-8", "replace")
    docs = [d for d in text.split("\x00") if d]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(docs, trainer=trainer)
    info = {"source": "trained by the benchmark on the eval data (no tokenizer.json next to the checkpoint)",
            "train_bytes": int(min(len(data), max_bytes)), "vocab_size": tok.get_vocab_size()}
    return tok, info


def get_bpe(checkpoint_path: Path | None, eval_data: np.ndarray | None, vocab_size: int = 4096, model=None):
    """The tokenizer to count BPE tokens with: a token model's own, else tokenizer.json next to the
    checkpoint (or the config's tokenizer_path), else one trained here on the eval data."""
    if model is not None and getattr(model, "token_level", False):
        bpe = model.bpe
        return bpe.tokenizer, {"source": "the model's own tokenizer", "vocab_size": bpe.vocab_size}
    try:
        tok, info = load_bpe(checkpoint_path)
        tp = getattr(getattr(model, "config", None), "tokenizer_path", "")
        if tok is None and tp and Path(tp).is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(tp)
            info = {"source": "config.tokenizer_path", "path": tp, "vocab_size": tok.get_vocab_size()}
        if tok is None and eval_data is not None:
            tok, info = train_bpe_on(eval_data, vocab_size)
        return tok, info
    except ImportError:
        return None, {"source": "none: the `tokenizers` package is not installed (pip install tokenizers)"}


# ------------------------------------------------------------------ per language


def _byte_exact(tok):
    """The tokenizer as a ByteBPE (token ids of any bytes, invalid UTF-8 included), or None for one that is not a
    byte-level BPE with all 256 single bytes (counted on its text, as before)."""
    if tok is None:
        return None
    from ..data.bpe import ByteBPE

    try:
        return ByteBPE(tok)
    except (UserError, AttributeError, TypeError):
        return None


def run_multilingual(model, directories: list[Path], seq_len: int, batch_size: int, device, amp_dtype=None,
                     max_lang_bytes: int = 65536, bpe=None, parallel_names: tuple[str, ...] = ("udhr",)) -> dict:
    t0 = time.perf_counter()
    groups = []
    exact = _byte_exact(bpe)
    for d in directories:
        d = Path(d)
        if not d.is_dir():
            raise UserError(f"--multilingual_dir '{d}' is not a directory; pass a folder with one file per language")
        langs, empty = {}, []
        files = language_files(d)
        # a row per file: files of one stem (hello.c, hello.py) were keyed alike, and the later one's row replaced the
        # earlier's without a word; those keep their suffix
        stems = [f.stem for f in files]
        for f in files:
            raw = f.read_bytes()[:max_lang_bytes]
            raw = raw.replace(b"\x00", b"")
            # one byte is enough (scored after the separator put before it below); an empty file is listed
            if not raw:
                empty.append(f.name)
                continue
            # a document as in training: the separator byte first, so every model scores every byte of the file
            # (without it byte models skipped the first byte and the BPE model its first token)
            data = np.frombuffer(b"\x00" + raw, dtype=np.uint8)
            r, method = evaluate_bpb(model, data, seq_len, batch_size, device, amp_dtype=amp_dtype)
            bpb = float(r["bpb"])
            scored = int(r["bytes"])
            rec = {"file": str(f), "bytes": len(raw), "bytes_scored": scored, "bpb": bpb, "ppl": float(r["ppl"]),
                   # bits for the whole content (every byte is scored; bpb x bytes kept for older readers' sake)
                   "total_bits": bpb * len(raw), "bytes_per_patch": float(r["bytes_per_patch"]),
                   "patches": len(raw) / float(r["bytes_per_patch"]), "truncated": f.stat().st_size > max_lang_bytes,
                   # what a rerun must score: the path alone (often relative, the files may change) did not pin it
                   "sha256": hashlib.sha256(raw).hexdigest(), "sha256_of": "the bytes scored (cut, NUL removed)"}
            if bpe is not None:
                # the file's own bytes: decoding with "replace" first made a character cut by max_lang_bytes (or any
                # invalid byte) three bytes of U+FFFD, and 2,048 bytes of Chinese counted 2,050 tokens
                n_tok = (len(exact.encode_docs([raw])[0]) if exact is not None else
                         len(bpe.encode(raw.decode("utf-8", "replace")).ids))
                rec["bpe_tokens"] = n_tok
                rec["bytes_per_bpe_token"] = len(raw) / max(n_tok, 1)
            langs[f.stem if stems.count(f.stem) == 1 else f.name] = rec
        parallel = d.name.lower() in parallel_names or (d / "PARALLEL").exists()
        group = {"dir": str(d), "parallel": parallel, "languages": langs, "bpb_method": method if langs else None,
                 "empty_files": empty}
        if parallel and langs:
            # english if there is one, else the first file: recorded, so the ratio is not read as "vs english"
            ref = "english" if "english" in langs else next(iter(langs))
            group["reference"] = ref
            ref_bits = langs[ref]["total_bits"]
            for rec in langs.values():  # key name kept for older readers; "reference" says what it is against
                rec["total_bits_vs_english"] = rec["total_bits"] / ref_bits if ref_bits else float("nan")
        groups.append(group)
    return {"groups": groups, "max_lang_bytes": max_lang_bytes, "seconds": time.perf_counter() - t0}
