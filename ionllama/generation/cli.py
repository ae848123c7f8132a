"""`ionllama generate --checkpoint PATH --prompt "..."`: stream a continuation to the terminal."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import OneLineParser, UserError, check_ranges, cli_entry, first_line, is_out_of_memory
from .prompts import normalize_stops
from .sampling import SamplingConfig
from .utf8 import Utf8StreamDecoder

# the sampler takes seeds modulo 2**63 (negative ones too): a seed outside would draw another seed's bytes
SEED_MAX = 2**63 - 1


def load_checkpoint_model(path: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """The trainer's loader (.pt training checkpoint, .safetensors export, sharded .dcp folder: the trainer owns
    the file formats). Any failure: UserError."""
    from ..train.checkpoint import load_model

    if not os.path.exists(path):
        raise UserError(f"checkpoint '{path}' not found; pass the .pt file written by `ionllama train`")
    try:
        model = load_model(path, device=device, dtype=dtype)
    except UserError:
        raise
    except Exception as e:  # corrupt / foreign file: one line, no traceback
        raise UserError(f"cannot load checkpoint '{path}' ({type(e).__name__}: {str(e)[:120]}); "
                        "is it an ionllama checkpoint?") from None
    return model


def _note_untrained(path: str) -> None:
    """A phase-1 checkpoint generates from an untrained main model: say so, as `ionllama bench` does."""
    from ..train.checkpoint import checkpoint_phase

    if checkpoint_phase(path) == "entropy":
        print(f"note: {path} was written in phase 1: only the entropy model has trained, the main model is at its "
              "initialisation, so this output is noise; generate from a checkpoint of the main phase", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ionllama generate", description="Generate text from a checkpoint: the prompt and its "
                      "continuation stream to the terminal as UTF-8 (an invalid byte shows as U+FFFD; --output "
                      "keeps the exact bytes).")
    p.add_argument("--checkpoint", required=True,
                   help="model checkpoint: a .pt of `ionllama train`, its .safetensors export or a torchrun run's .dcp "
                        "folder")
    # appended, so that a second --prompt is refused instead of silently replacing the first (one prompt a run)
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (UTF-8) (default: empty, which starts a new document)")
    p.add_argument("--prompt_file", action="append", default=None,
                   help="read the prompt's raw bytes from this file ('-': stdin), e.g. bytes a shell argument "
                   "cannot carry (NUL) or a long document; instead of --prompt (default: none)")
    p.add_argument("--each_line", action="store_true",
                   help="read prompts from stdin, one per line (its bytes without the line end; an empty line starts "
                        "a new document), and print a continuation line for each as it comes, the prompts not "
                        "echoed: the model loads once, and its decoder, compiled step and CUDA graphs are kept for "
                        "the next line where it fits them (generate's DecodeSession; not for a BPE model); with "
                        "--seed S the i-th line (from 0) samples with seed S + i; ends at the end of input (a "
                        "continuation may hold line breaks: in bash --stop $'\\n' keeps one line each) (default: off)")
    p.add_argument("--max_new_bytes", type=int, default=256,
                   help="most bytes to generate; a stop string or the end-of-document byte 0x00 ends it sooner "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 is argmax, as --greedy (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=None,
                   help="sample only among the K likeliest bytes, K >= 1 (default: off)")
    p.add_argument("--top_p", type=float, default=None,
                   help="sample only among the likeliest bytes holding probability P, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed, 0 to 2**63-1: the same seed and flags repeat a run's bytes (default: a random "
                        "seed, printed to stderr)")
    p.add_argument("--greedy", action="store_true",
                   help="argmax decoding: no sampling; the sampling flags and --seed have no effect (default: off)")
    p.add_argument("--stop", action="append", default=None,
                   help="end when the output ends with this string, which is left out; repeatable (default: none)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N | mps; auto takes cuda, else mps, when visible (default: "
                        "%(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the weights' and decoding's dtype (checkpoints store fp32): auto is bf16 on a CUDA GPU with "
                        "native bf16 (Ampere and later; the dtype the generation benchmarks time), fp32 elsewhere; a "
                        "seed's bytes differ between the two (default: %(default)s)")
    p.add_argument("--cuda_graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay each byte's decode step as a CUDA graph (CUDA only): auto is on for --max_new_bytes "
                        ">= 64; off if a capture fails (default: %(default)s)")
    p.add_argument("--compile", default="none", choices=["none", "default", "max-autotune"],
                   help="torch.compile the decode step (GPU: fewer kernels per byte; max-autotune was the "
                        "fastest measured but compiles for ~2 min) (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None, metavar="BITS",
                   help="entropy patching: the patch threshold in bits, in place of the one calibrated in training; "
                        "higher gives longer patches and fewer latent steps (--stats shows bytes/patch) "
                        "(default: the checkpoint's)")
    p.add_argument("--stats", action="store_true",
                   help="after the text, one line on stderr: new bytes, seconds and bytes/s of the generation (the "
                        "model's loading left out), device, dtype, and whether CUDA graphs were replayed "
                        "(default: off)")
    p.add_argument("--no_prompt_echo", action="store_true",
                   help="print only the continuation, not the prompt first (default: off)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="also write the generated bytes, exact (no prompt, no final newline), to FILE; it is "
                        "replaced atomically once generation ends (default: none)")
    return p


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """--dtype as a torch dtype. auto: bf16 where the GPU has it natively (before Ampere torch emulates it, slowly;
    asked of the current GPU, the one --device cuda means), else fp32 (CPU, MPS: bf16 there is slow or partial)."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if cuda else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _writer(stream):
    """Write text to a terminal whose encoding may not cover every character."""
    enc = getattr(stream, "encoding", None) or "utf-8"

    def write(text: str) -> None:
        if text:
            stream.write(text.encode(enc, errors="replace").decode(enc, errors="replace"))
            stream.flush()

    return write


def _one_prompt(args) -> None:
    """--prompt / --prompt_file as single values; a repeated one is refused (the last silently won)."""
    for name in ("prompt", "prompt_file"):
        given = getattr(args, name)
        if given is not None and len(given) > 1:
            raise UserError(f"--{name} given {len(given)} times; this command generates from one prompt: pass one "
                            "(several prompts: run it once per prompt, or batch them in Python with "
                            "model.generate([b'...', b'...']))")
        setattr(args, name, None if given is None else given[0])
    if args.prompt is None:
        args.prompt = ""


def _read_prompt(args) -> bytes:
    if args.prompt_file is None:
        # surrogateescape: argv bytes that were not valid UTF-8 reach the model unchanged
        return args.prompt.encode("utf-8", errors="surrogateescape")
    if args.prompt:
        raise UserError("pass --prompt or --prompt_file, not both")
    if args.prompt_file == "-":
        if sys.stdin is None:  # started with stdin closed (`<&-`, some job runners): an AttributeError traceback
            raise UserError("--prompt_file - reads stdin, which is closed; pipe the prompt in, or pass "
                            "--prompt_file PATH")
        try:
            return sys.stdin.buffer.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt from stdin ({e.strerror or e}); pipe the prompt in, or pass "
                            "--prompt_file PATH") from None
    try:
        return Path(args.prompt_file).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read --prompt_file {args.prompt_file} ({e.strerror or e}); pass a readable file, "
                        "or '-' for stdin") from None


def _same_or_inside(out: Path, other: Path) -> bool:
    """True when writing `out` would replace `other` (the same file: its resolved path, or os.path.samefile for a
    hard link) or put a file inside it (a sharded .dcp checkpoint folder)."""
    try:
        o, p = out.resolve(), other.resolve()
        if o == p or (other.is_dir() and p in o.parents):
            return True
        return out.exists() and other.exists() and os.path.samefile(out, other)
    except (OSError, RuntimeError):  # a symlink loop: the loader or the write says so in its own line
        return False


def _check_output_target(args) -> None:
    """--output must not be the checkpoint or the prompt file: the atomic replace wrote the continuation over
    them without a word (a 5-byte file where the checkpoint was)."""
    if args.output is None:
        return
    if not args.output.strip():  # a blank name wrote a file named "  " (and "" read as the folder ".")
        raise UserError("--output is empty; pass a file name, or leave --output out (the text goes to stdout)")
    out = Path(args.output)  # (a symlink is written through to its target: fsutil.write_target)
    if out.exists() and not out.is_file() and not out.is_dir():
        # said here, before any output; fsutil.fsync_replace refuses it too (a rename would replace the pipe)
        raise UserError(f"--output {args.output} is not a regular file (a pipe or a device); pass a file name, or "
                        "leave --output out and redirect stdout")
    sources = [("--checkpoint", args.checkpoint)]
    if args.prompt_file not in (None, "-"):
        sources.append(("--prompt_file", args.prompt_file))
    for flag, src in sources:
        if src and _same_or_inside(out, Path(src)):
            what = f"the {flag}" if not Path(src).is_dir() else \
                "the checkpoint folder" if out.resolve() == Path(src).resolve() else "inside the checkpoint folder"
            raise UserError(f"--output {args.output} is {what} {src}, which would be overwritten; pass another "
                            "--output")


def _open_output(path: str | None):
    """The temp file beside --output, opened before the model loads: an unwritable path is one early line."""
    if path is None:
        return None, None
    from ..fsutil import temp_path

    if Path(path).is_dir():
        raise UserError(f"--output {path} is a folder; pass a file name")
    tmp = temp_path(path)
    try:
        return tmp, open(tmp, "wb")
    except OSError as e:
        raise UserError(f"cannot write --output {path} ({e.strerror or e}); pass a file in a writable folder") from None


def _check_each_line(args) -> None:
    """--each_line takes its prompts from stdin and prints one line each: the one-prompt flags are refused."""
    for flag, given in (("--prompt", args.prompt), ("--prompt_file", args.prompt_file), ("--output", args.output)):
        if given is not None:
            raise UserError(f"--each_line reads its prompts from stdin, one per line, and prints one continuation "
                            f"line each; leave {flag} out")
    if sys.stdin is None:
        raise UserError("--each_line reads prompts from stdin, which is closed; pipe them in, one per line")


def _stdin_lines():
    """stdin's lines as bytes, without their line ends (LF or CRLF), read as they arrive."""
    if sys.stdin.isatty():  # (after the model loaded: a terminal would otherwise wait without a word)
        print("reading prompts from the terminal, one per line; end with ^D", file=sys.stderr)
    while True:
        try:
            line = sys.stdin.buffer.readline()
        except OSError as e:
            raise UserError(f"cannot read a prompt from stdin ({e.strerror or e}); pipe the prompts in") from None
        if not line:
            return
        yield line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.each_line:
        _check_each_line(args)
    else:
        _one_prompt(args)
    # before the checkpoint: a bad name must not read as a bad checkpoint (mps, meta and xpu passed torch's parser
    # here and failed in the loader or in a traceback)
    device = str(resolve_device(args.device))
    # the sampling flags before the checkpoint loads and the prompt is echoed: the error line stands alone, early
    SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
    normalize_stops(args.stop)
    check_ranges(args, {"max_new_bytes": 0})
    if args.threshold is not None and not math.isfinite(args.threshold):  # (nan, inf: before the checkpoint loads)
        raise UserError(f"--threshold must be a finite number of bits, got {args.threshold}")
    if args.cuda_graphs == "on" and torch.device(device).type != "cuda":  # generate() would ignore it without a word
        raise UserError(f"--cuda_graphs on needs a CUDA device, not {device} (--device {args.device}); leave "
                        "--cuda_graphs out")
    if args.seed is not None and not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed must be 0 to 2**63-1 (got {args.seed}): the sampler takes seeds modulo 2**63, so "
                        "it would repeat another seed's bytes; pass a seed in that range")
    _check_output_target(args)  # before the prompt is read from a file the output would replace
    if sys.stdout is None:  # started with stdout closed (`>&-`): the echo was an AttributeError traceback
        raise UserError("stdout is closed, and the text streams there; redirect it (e.g. >/dev/null with --output "
                        "FILE for the bytes alone)")
    if args.each_line:
        with _terminate_unwinds():
            _generate_lines(args, device)
        return 0
    prompt = _read_prompt(args)  # before the checkpoint: a missing file is one early line
    tmp, out_file = _open_output(args.output)
    try:
        with _terminate_unwinds():  # the writing too: a SIGTERM during the final flush left the temp file
            out = _generate(args, device, prompt)
            if out_file is not None:
                from ..fsutil import fsync_replace

                with out_file:
                    out_file.write(out)
                fsync_replace(tmp, args.output)
    finally:  # an error or ^C leaves an earlier --output file as it was, and no temp file
        if out_file is not None:
            out_file.close()
            Path(tmp).unlink(missing_ok=True)
    return 0


@contextlib.contextmanager
def _terminate_unwinds():
    """SIGTERM (`kill`, a job scheduler's stop) exits through the `finally` as ^C does: it ended the process at once
    and left the --output temp file behind. Exit status 143 = 128 + SIGTERM, what a shell reports."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (main() called from a worker thread): the default stays
        yield
        return
    try:
        yield
    finally:  # (None: a handler set outside Python, which cannot be put back; the default is the nearest)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


def set_threshold(model, bits: float) -> None:
    """--threshold: the entropy threshold the patcher reads (a buffer), for this run only (main() has refused a
    non-finite value before the checkpoint loaded)."""
    patching = getattr(model.config, "patching", None)
    if not hasattr(model, "entropy_threshold") or patching != "entropy":
        # (a dense or BPE config carries the default patching="entropy" too: say what the model is)
        what = f"patches by '{patching}'" if model.config.model == "ionllama" else \
            f"is a '{model.config.model}' model, without patches"
        raise UserError(f"--threshold is for entropy patching; this checkpoint {what}; leave --threshold out")
    model.entropy_threshold.fill_(bits)


def _generate(args, device: str, prompt: bytes) -> bytes:
    """Stream the continuation to stdout; return its exact bytes."""
    model, kw = _load_for_generation(args, device)
    _draw_seed(args, "these bytes")
    return _continue(args, model, kw, prompt, echo=not args.no_prompt_echo)


def _generate_lines(args, device: str) -> None:
    """--each_line: one continuation line per stdin line, the model, its compiled step and its CUDA graphs kept
    between them (a DecodeSession; the BPE model's own token decoder keeps nothing)."""
    from . import DecodeSession

    model, kw = _load_for_generation(args, device)
    if getattr(model.config, "model", None) != "bpe":
        kw["session"] = DecodeSession()
    _draw_seed(args, "this run's bytes (line i samples with seed + i)")
    base = args.seed
    for i, line in enumerate(_stdin_lines()):
        if base is not None:
            args.seed = (base + i) & SEED_MAX
        try:
            _continue(args, model, kw, line, echo=False)
        except UserError as e:  # which line failed (a long one outgrows the memory sooner)
            raise UserError(f"stdin line {i + 1} ({len(line):,} bytes): {e}") from None


def _load_for_generation(args, device: str):
    """The checkpoint's model on the device in --dtype, with --threshold set, and generate's keyword options."""
    model = load_checkpoint_model(args.checkpoint, device, resolve_dtype(args.dtype, device))
    if args.threshold is not None:  # before the phase-1 note: a refusal stays one line
        set_threshold(model, args.threshold)
    _note_untrained(args.checkpoint)
    kw = {"cuda_graphs": {"auto": "auto", "on": True, "off": False}[args.cuda_graphs]}
    if args.compile != "none":
        if getattr(model.config, "model", None) == "bpe":  # its own token decoder (a KV cache), not the byte runner
            raise UserError("--compile is for the byte models' decoder; leave it out for a BPE checkpoint")
        kw["compile"] = args.compile
    return model, kw


def _draw_seed(args, what: str) -> None:
    # a sampled run worth keeping could not be repeated: say its seed (not where nothing is sampled: argmax, no bytes)
    if args.seed is None and not args.greedy and args.temperature != 0 and args.max_new_bytes > 0:
        args.seed = int.from_bytes(os.urandom(8), "little") & SEED_MAX  # (after every check: errors stay one line)
        print(f"seed {args.seed} (pass --seed {args.seed} to repeat {what})", file=sys.stderr)


def _continue(args, model, kw: dict, prompt: bytes, echo: bool) -> bytes:
    """Stream one prompt's continuation to stdout (after the prompt, if echo), ending the line; its exact bytes."""
    from .runner import GraphCaptureError

    to_stdout, wrote = _writer(sys.stdout), [False]

    def write(text: str) -> None:
        wrote[0] = wrote[0] or bool(text)
        to_stdout(text)

    def end_line() -> None:  # before an error line: ends what was written, and writes no empty line
        tail = utf8.flush()
        if tail or wrote[0]:
            write(tail + "\n")

    utf8 = Utf8StreamDecoder()  # one decoder for prompt and continuation: a character may straddle the two
    if echo:
        write(utf8.decode(prompt))
    try:
        # model.generate, not the byte models' function: a BPE checkpoint encodes the prompt with its own
        # tokenizer and emits the bytes of its tokens (token ids read as bytes crashed or printed U+FFFD)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_bytes=args.max_new_bytes, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed, stop=args.stop,
                             stream=lambda _row, chunk: write(utf8.decode(chunk)), return_info=args.stats, **kw)
        seconds = time.perf_counter() - t0
        out, info = out if args.stats else (out, {})
    except (MemoryError, RuntimeError, TypeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        # the decoder's caches hold the prompt and every new byte, growing as the output does: a long generation can
        # outgrow the memory, in torch
        if isinstance(e, GraphCaptureError) and not is_out_of_memory(e):
            # its advice, cuda_graphs=False, is the API's: say the flag (and torch's reason, not the runner's text)
            cause = e.__cause__ or e
            end_line()
            raise UserError(f"capturing the decode step as a CUDA graph failed ({type(cause).__name__}: "
                            f"{first_line(cause)}); pass --cuda_graphs off") from None
        if not is_out_of_memory(e):
            raise
        end_line()  # end the echoed prompt's line, so the error line stands alone
        raise UserError(f"not enough memory for --max_new_bytes {args.max_new_bytes} (the decoder's caches hold the "
                        "prompt and every new byte); pass a smaller --max_new_bytes") from None
    write(utf8.flush() + "\n")
    if args.stats:
        print(_stats_line(len(out), seconds, model, info.get("decode"), args), file=sys.stderr)
    return bytes(out)


def _stats_line(n: int, seconds: float, model, decode: dict | None, args) -> str:
    """--stats: what a user needs to tell a slow run from a broken one (were the CUDA graphs used at all?)."""
    p = next(model.parameters())
    rate = f"{n / seconds:,.0f} bytes/s" if seconds > 0 and n else "- bytes/s"
    where = f"{p.device}, {str(p.dtype).replace('torch.', '')}, compile {args.compile}"
    if decode is None:  # a BPE checkpoint: its own token decoder, no byte runner
        how = "token decoder with a KV cache"
    elif decode["cuda_graphs"]:
        how = f"CUDA graphs replayed for {decode['steps'] - decode['eager_steps']:,} of {decode['steps']:,} steps"
    else:
        how = f"no CUDA graphs ({decode['steps']:,} eager steps)"
    steady = ""
    if decode is not None and decode.get("rest_s", 0) > 0 and decode.get("rest_steps", 0) > 0:
        # the first run compiles and captures: its seconds said apart, or a short run looks slow for no reason
        steady = (f"; {decode['rest_steps'] / decode['rest_s']:,.0f} bytes/s after the "
                  f"first run ({decode['first_run_steps']} byte{'' if decode['first_run_steps'] == 1 else 's'}, "
                  f"{decode['first_run_s']:.2f} s)")
    patches = ""
    if decode is not None and decode.get("patches"):  # ionLlama: how its patcher cut prompt and output
        patches = f"; {decode['positions'] / decode['patches']:.2f} bytes/patch over prompt and output"
    return f"[generate] {n:,} new bytes in {seconds:.2f} s ({rate}; {where}; {how}{steady}{patches})"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
