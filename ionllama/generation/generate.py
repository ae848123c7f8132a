"""`generate`: prefill with the parallel forward, then one cached decoder step per byte."""
from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

import torch

from ..errors import UserError, is_whole
from ..model.common import eval_mode
from .decoding import check_decoder_options, decoder_for, shape_bucket
from .runner import (DecodeRunner, check_unroll, compile_options, entropy_branch_possible, no_entropy_branch,
                     no_overlap_latent, no_overlap_with_unroll, overlap_latent_possible)
from .prompts import DOC_SEP, RowOutput, normalize_prompts, normalize_stops
from .sampling import SamplingConfig, is_flag

StreamFn = Callable[[int, bytes], None]
# new bytes the decoder's caches hold before they first grow: every generation the benchmarks time (up to 32K bytes
# of context) keeps one cache and one graph capture, as before growth existed
INITIAL_NEW_BYTES = 65536
STREAM_CHUNK = 8  # bytes a streamed generation with CUDA graphs reads back at once


def _row_seeds(seed, n: int, device, draw: bool = True) -> torch.Tensor:
    """Row r gets seed + r (or seeds[r] for a list). So row r of a batch generated with `seed`
    equals a single-prompt call with seed + r, whatever else is in the batch. draw=False (greedy: nothing is
    sampled): seed None gives zeros and leaves torch's RNG alone (drawing moved it, and every later draw)."""
    if seed is None:
        base = int(torch.randint(0, 2**62, (1,)).item()) if draw else 0  # follows torch.manual_seed, if set
        seeds = [base + r for r in range(n)]
    elif is_whole(seed):  # numpy ints too, as for prompts and max_new_bytes
        seeds = [int(seed) + r for r in range(n)]
    elif isinstance(seed, Sequence) and len(seed) == n and all(is_whole(s) for s in seed):
        seeds = [int(s) for s in seed]
    else:
        raise UserError(f"seed must be an int, None, or a list of {n} ints (one per prompt)")
    return torch.tensor([s & (2**63 - 1) for s in seeds], dtype=torch.long, device=device)


@torch.no_grad()
def generate(model, prompt_bytes, max_new_bytes: int = 256, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, seed=None, stop=None,
             stream: StreamFn | None = None, decoder: str = "auto", return_info: bool = False,
             cuda_graphs="auto", compile: bool | str = False, fused_local_step: bool | str = "auto",
             fused_entropy_step: bool | str = "auto", fused_latent_step: bool | str = "auto",
             entropy_branch: bool | str = "auto", unroll: int = 1, session: "DecodeSession | None" = None,
             overlap_latent: bool | str = "auto"):
    """Continue `prompt_bytes` with up to `max_new_bytes` sampled bytes.

    prompt_bytes: bytes | str (UTF-8) | list[int] | 1-D tensor (one prompt), or a list of those /
        a 2-D tensor (a batch; lengths may differ). An empty prompt starts from DOC_SEP (0x00).
    greedy / temperature=0: argmax. top_k, top_p: filters applied after temperature.
    seed: int -> row r uses seed + r; list -> one seed per row; None -> drawn from torch's RNG. Seeds are taken
        modulo 2**63 (the generator's range), so seed and seed + 2**63 sample alike.
    stop: str | bytes | list of them; generation of a row ends at DOC_SEP (0x00) or when its output
        ends with a stop string. Neither the DOC_SEP byte nor the stop string is in the result.
    stream: callback stream(row, chunk) called with each piece of output as soon as it is final
        (bytes that might begin a stop string are held back; with CUDA graphs the bytes are read back
        STREAM_CHUNK at a time); chunks concatenate to the result.
    decoder: 'auto' (cached incremental state) | 'recompute' (full forward per byte, reference).
    cuda_graphs: 'auto' (on CUDA for >= 64 new bytes) | True | False: replay the decode step as a graph
        (not for the 'recompute' decoder; a failed capture raises a RuntimeError, see runner.py).
    compile: torch.compile the decode step before capture (slow first call, fewer kernels): True, or
        "max-autotune" (fastest measured on a GPU, ~2 min to compile; runner.COMPILE_PRESETS).
    fused_local_step: ionLlama's IntegralLNN local layers step through four fused Triton kernels per block.
        "auto" (default): on CUDA for up to 32 prompts of a bf16 or fp16 model (measured: same bytes, 1.3x the
        bytes/s at batch 1; in fp32 the fused steps were 2.8x slower);
        True: required (CUDA, or CPU under TRITON_INTERPRET=1: else a UserError); False: the PyTorch step.
    fused_entropy_step: ionLlama's entropy model steps through fused Triton kernels (two per Mamba block, one
        for the head and the entropy). "auto" (default): on CUDA for up to 32 prompts of a bf16 or fp16
        entropy-patching model (measured at batch 1: the byte graph 0.102-0.105 ms against 0.109-0.110 with PDL);
        True: required (CUDA, or CPU under TRITON_INTERPRET=1, entropy patching: else a UserError); False: the
        PyTorch step.
    fused_latent_step: ionLlama's latent blocks step through five fused Triton kernels per block. "auto"
        (default): on CUDA for up to 32 prompts of a bf16 or fp16 model (measured: same bytes, the latent stage
        23 % less GPU time at batch 1); True: required (CUDA, or CPU under TRITON_INTERPRET=1: else a UserError);
        False: PyTorch.
    entropy_branch: ionLlama with entropy patching: the entropy model on a second CUDA stream beside the local
        layers. "auto" (default): on CUDA for up to 2 prompts (measured at batch 1, same bytes: byte graph
        0.101 -> 0.086 ms; with latent_shift "completed" 0.146 -> 0.129-0.135 ms per byte); True: on for every batch
        size (a model without entropy patching: a UserError; off CUDA the two parts run one after the other);
        False: off.
    unroll: with CUDA graphs, bytes per graph launch. Fixed patching under the runner's host_schedule (on by
        default with latent_shift "completed"): the host knows which bytes close a patch, so each span of `unroll`
        bytes is one graph with the latent stage inside, streamed too. Otherwise each byte's latent step is a
        conditional graph node (needs CUDA 12.4+ and a torch with CUDAGraph.begin_capture_to_if_node, which torch
        2.11 lacks: there a UserError), and a stream callback decodes one launch per byte. 1 (default): one launch
        per byte. The span graphs measured 3 % slower than one launch a byte on an H100 (unroll=16, fixed-4-byte
        pick, docs/results/checks-s51.md), the conditional nodes are not measured: keep 1 unless measured otherwise.
    overlap_latent: ionLlama with fixed patching and latent_shift "previous": under CUDA graphs, each patch's latent
        step runs on a second stream beside the bytes around it (same bytes). "auto" (default): on under CUDA graphs
        for up to 2 prompts (compiled, batch 1: 7,578-7,675 -> 9,280-9,463 bytes/s on an H100,
        docs/results/checks-s56.md), unless unroll > 1 (which it does not combine with); True: on for any batch
        size (another model, or unroll > 1: a UserError); False: off.
    session: a DecodeSession to keep this call's decoder (caches, compiled steps, captured CUDA graphs) for the next
        call given the same session: a call with the same model, weights, batch size, sampling settings and
        options prefills the kept decoder in place and skips building, warming up and capturing. None (default):
        nothing is kept.
    Returns the generated bytes (continuation only) for one prompt, a list of bytes for a batch;
    with return_info=True, (result, info) where info has stop_reasons and decode: {steps (decoder iterations),
    eager_steps (those not replayed from a CUDA graph: the warm-up, or all without graphs), cuda_graphs (any replayed),
    setup_s (host seconds for the decoder, the prompt's prefill and the runner, before the first run; GPU work queued
    there may finish in the first run), first_run_steps / first_run_s / rest_s (the first run, which holds compiling
    and capturing, timed apart from the rest; on CUDA first_run_s also holds queueing the second run, and any span
    graph that run records), rest_steps (the steps read back in rest_s: not a run still queued at a stop), and for
    ionLlama at batch 1 patches / positions (its patches over the positions the decoder took in: the prompt and every
    decoded byte, those past a stop too)}; max_new_bytes=0 gives the first three only.
    """
    if getattr(model, "token_level", False) and getattr(model, "generate", None) is not None:
        # this loop samples byte ids: a token model's ids above 255 crashed it ("byte must be in range(0, 256)")
        raise UserError(f"{type(model).__name__} predicts tokens, not bytes; call its own model.generate(...), "
                        "which encodes the prompt and decodes the tokens it samples")
    rows, is_batch = normalize_prompts(prompt_bytes)
    if not rows:
        raise UserError("empty batch of prompts; pass at least one prompt")
    if not is_whole(max_new_bytes) or max_new_bytes < 0:
        raise UserError(f"max_new_bytes must be a whole number >= 0, got {max_new_bytes!r}")
    max_new_bytes = int(max_new_bytes)  # a numpy int counts too
    check_call_options(stream=stream, return_info=return_info, cuda_graphs=cuda_graphs)
    if session is not None and not isinstance(session, DecodeSession):
        raise UserError(f"session must be a DecodeSession (ionllama.generation.DecodeSession()) or None, got "
                        f"{type(session).__name__}")
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    compile_options(compile)  # a bad value fails here, before any work
    check_unroll(unroll)
    stops = normalize_stops(stop)
    rows = [r if r else [DOC_SEP] for r in rows]
    B = len(rows)
    # every option checked before any work, max_new_bytes=0 too (it returned b'' for decoder='x', seed='x')
    _row_seeds(seed, B, "cpu", draw=False)
    check_decoder_options(decoder, fused_local_step, fused_entropy_step, fused_latent_step)
    if entropy_branch not in (True, False, "auto"):
        raise UserError(f"entropy_branch must be True, False or 'auto'; got {entropy_branch!r}")
    if overlap_latent not in (True, False, "auto"):
        raise UserError(f"overlap_latent must be True, False or 'auto'; got {overlap_latent!r}")
    if unroll > 1:  # (a stream callback sets the runner's unroll after it is built: decided here for both)
        if overlap_latent is True:
            raise no_overlap_with_unroll()
        overlap_latent = False
    outs = [RowOutput(stops) for _ in range(B)]

    decode = {"steps": 0, "eager_steps": 0, "cuda_graphs": False}
    with eval_mode(model):
        if max_new_bytes > 0:
            with model_precision(model):
                decode = _decode_loop(model, rows, outs, cfg, max_new_bytes, seed, stream, decoder, cuda_graphs,
                                      compile, fused_local_step, fused_entropy_step, fused_latent_step,
                                      entropy_branch, unroll, session=session, overlap_latent=overlap_latent)
        else:  # the options that depend on the model, refused as they are when bytes are asked for (b'' before)
            with torch.no_grad(), model_precision(model):
                _check_applicable(decoder_for(model, B, 2, decoder, fused_local_step=fused_local_step,
                                              fused_entropy_step=fused_entropy_step,
                                              fused_latent_step=fused_latent_step), entropy_branch, overlap_latent)
    return finish_outputs(outs, stream, is_batch, return_info, decode)


def check_call_options(stream=None, return_info=False, cuda_graphs="auto") -> None:
    """generate()'s options that were taken as they came (an audit): return_info="x" returned a tuple,
    cuda_graphs="x" meant True on CUDA, and stream=5 failed after the prefill, in a TypeError."""
    if stream is not None and not callable(stream):
        raise UserError(f"stream must be a function stream(row, chunk) or None, got {stream!r}")
    if not is_flag(return_info):
        raise UserError(f"return_info must be True or False, got {return_info!r}")
    if not (cuda_graphs == "auto" or is_flag(cuda_graphs)):
        raise UserError(f"cuda_graphs must be True, False or 'auto', got {cuda_graphs!r}")


def model_precision(model):
    """Decoding runs in the model's own dtype: an autocast region around `generate` (a training loop's
    evaluation, say) is switched off, since the caches are written in the model's dtype and a bf16
    prefill would otherwise write into fp32 caches (and the stepwise==parallel guarantee is for one dtype)."""
    dev = next(model.parameters()).device
    return torch.autocast(device_type=dev.type, enabled=False)


def finish_outputs(outs, stream, is_batch: bool, return_info: bool, decode: dict | None = None):
    """Flush held-back bytes to the stream and shape the result (shared by every model's generate)."""
    for r, o in enumerate(outs):
        tail = o.finish()
        if stream is not None and tail:
            stream(r, tail)
    results = [o.result for o in outs]
    result = results if is_batch else results[0]
    if return_info:
        info = {"stop_reasons": [o.stop_reason for o in outs]}
        if decode is not None:  # how the bytes were decoded: were the CUDA graphs used, or silently not?
            info["decode"] = decode
        return result, info
    return result


def _use_cuda_graphs(setting, device, max_new_bytes) -> bool:
    if setting == "auto":  # capture costs a few eager steps; worth it for longer generations
        return device.type == "cuda" and max_new_bytes >= 64
    return bool(setting) and device.type == "cuda"


def _check_applicable(dec, entropy_branch, overlap_latent="auto") -> None:
    """entropy_branch=True on a decoder that cannot branch, overlap_latent=True on one that cannot overlap (the fused
    flags are checked by decoder_for)."""
    if entropy_branch is True and not entropy_branch_possible(dec):
        raise no_entropy_branch()
    if overlap_latent is True and not overlap_latent_possible(dec):
        raise no_overlap_latent()


class DecodeSession:
    """Keeps one generate() call's decoder and runner for the next call given the same session, when that call
    matches it (same model and weights, batch size, sampling settings, decoder options, streamed or not, graphs
    or not) whose longest prompt fits the kept caches: its prompt is then prefilled into them in place and the step
    runs from the kept compiled code and captured CUDA graphs, instead of building, warming up and capturing again
    (the caches still grow for a longer output, as in any call). A call that does not match replaces what is kept.
    The memory (caches, graph pool) and the model itself are held until the session is released or dropped.

        session = DecodeSession()
        for prompt in prompts:
            reply = model.generate(prompt, max_new_bytes=300, session=session)

    Weights are matched by each parameter's and buffer's storage and in-place version counter (an optimizer step,
    load_state_dict and fill_ all count; .to(), .half() and .float() give new storages, and the session holds the
    old ones, so no new one can take an old one's address); a write through `.data` is not seen: release() after
    one."""

    def __init__(self):
        self._kept = None  # (options key, weights key, runner, the weights' tensors: their storages stay allocated)
        self.reuses = 0  # calls that ran on a kept decoder

    def release(self) -> None:
        """Drop the kept decoder, caches and graphs (their memory goes back to torch's allocator)."""
        self._kept = None

    def take(self, model, key: tuple, prompt_len: int):
        """The kept runner if it matches this call and its caches hold the prompt (the runner grows them for the
        output as it goes); dropped from the session either way."""
        kept, self._kept = self._kept, None
        if kept is None or kept[0] != key or kept[1] != _weights_key(model) or kept[2].dec.max_len <= prompt_len:
            return None
        self.reuses += 1
        return kept[2]

    def keep(self, model, key: tuple, runner) -> None:
        held = tuple(t.detach() for t in (*model.parameters(), *model.buffers()))
        self._kept = (key, _weights_key(model), runner, held)


def _kernel_switches() -> tuple:
    """Which of the decoder's switchable kernels are on: the fused head (lnn_step_triton.head_on) and the fused
    n-gram embedding (embed_step_triton.embed_on). Read when a decoder is built, so a session's key holds them;
    read from the modules once imported (generate imports no triton): before that no decoder has taken them."""
    ls = sys.modules.get("ionllama.kernels.lnn_step_triton")
    es = sys.modules.get("ionllama.kernels.embed_step_triton")
    return (ls is not None and ls.head_on(), es is not None and es.embed_on())


def _weights_key(model) -> tuple:
    """The model itself, and where each parameter and buffer lives and how often it was written in place."""
    return (id(model),) + tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _pipelined(device) -> bool:
    """Queue the next run before reading a run's bytes back? On CUDA: the GPU then decodes while the host reads,
    checks stops and streams, instead of waiting idle at every read-back (one run more is decoded past a stop)."""
    return device.type == "cuda"


def _decoded_chunks(runner, max_new: int, first: int, every: int, pipelined: bool):
    """Run the runner `first`, then `every` steps at a time up to max_new, and yield (n, bytes of each row as a
    list) per run, in order. pipelined: each run's bytes are copied to the host without waiting (pinned memory,
    an event), the next run is queued, and only then is the copy waited for."""
    done, pending = 0, None
    while done < max_new or pending is not None:
        queued = None
        if done < max_new:
            n = min(every if done else first, max_new - done)
            runner.run(n)
            part = runner.out[:, done:done + n]  # (B, n); later steps write later columns, or a grown copy
            done += n
            if not pipelined:
                yield n, part.tolist()
                continue
            queued = (n, *_copy_to_host(part))
        if pending is not None:
            if pending[2] is not None:
                pending[2].synchronize()
            yield pending[0], pending[1].tolist()
        pending = queued


def _copy_to_host(part: torch.Tensor):
    """(host tensor, event to wait for or None): on CUDA a copy into pinned memory that does not wait, its event
    recorded on the tensor's own device (the model's GPU need not be the current device); elsewhere a copy."""
    if not part.is_cuda:
        return part.clone(), None
    host = part.to("cpu", non_blocking=True)  # (pinned: torch pins the target of a non-blocking copy to the CPU)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(part.device))
    return host, done


def _decode_loop(model, rows, outs, cfg, max_new_bytes, seed, stream, decoder_kind, cuda_graphs, compile,
                 fused_local_step="auto", fused_entropy_step="auto", fused_latent_step="auto",
                 entropy_branch="auto", unroll=1, session: DecodeSession | None = None, overlap_latent="auto"):
    B = len(rows)
    t_setup = time.perf_counter()  # decoder, prefill and runner: host time (a new prompt length's JIT shows here)
    prompt_len = max(len(r) for r in rows)
    # +1: the loop's last iteration also steps the decoder past the final sampled byte. Caches for up to
    # INITIAL_NEW_BYTES new bytes at first; the runner doubles them as the output gets longer (a large
    # max_new_bytes with a stop string expected early no longer allocates for all of it)
    cache_len = prompt_len + min(max_new_bytes, INITIAL_NEW_BYTES) + 1
    if compile_options(compile) is not None:  # compiled steps: bucketed shapes, so other lengths reuse the compile
        cache_len = shape_bucket(cache_len)
    device = next(model.parameters()).device
    graphs = _use_cuda_graphs(cuda_graphs, device, max_new_bytes)
    key = (B, decoder_kind, fused_local_step, fused_entropy_step, fused_latent_step, cfg, str(compile),
           entropy_branch, unroll, stream is None, graphs, overlap_latent, _kernel_switches())
    runner = session.take(model, key, prompt_len) if session is not None else None
    # Host syncs are the main per-byte overhead on a GPU: without a stream callback, sampled bytes stay on the
    # device and are inspected every `sync_every` steps, a whole number of unrolled graph launches (a few wasted
    # steps at most; on CUDA one run more, queued before the last one was read: _pipelined); with a stream callback
    # one step at a time, STREAM_CHUNK with graphs
    sync_every = 1 if stream is not None else -(-16 // unroll) * unroll
    if runner is not None:  # the session's decoder: prefilled in place, graphs and compiled steps kept
        dec = runner.dec
        seeds = _row_seeds(seed, B, dec.device, draw=not cfg.is_greedy)
        runner.restart(dec.prefill(rows), seeds, max_new_bytes, prompt_len)
    else:
        dec = decoder_for(model, B, cache_len, decoder_kind,
                          fused_local_step=fused_local_step, fused_entropy_step=fused_entropy_step,
                          fused_latent_step=fused_latent_step)
        _check_applicable(dec, entropy_branch, overlap_latent)  # before the prefill's work
        seeds = _row_seeds(seed, B, dec.device, draw=not cfg.is_greedy)
        logits = dec.prefill(rows)
        runner = DecodeRunner(dec, cfg, seeds, logits, max_new_bytes, cuda_graphs=graphs, compile=compile,
                              entropy_branch=entropy_branch, unroll=unroll if stream is None else 1,
                              prompt_len=prompt_len, overlap_latent=overlap_latent)
    if stream is not None and runner.want_graphs:
        # replayed graphs: the bytes come back STREAM_CHUNK at a time (under 1 ms of decoding at graph speed), not
        # one by one, so reading them back, the stop checks, the callback and the writes no longer stand between
        # two replays with the GPU idle (CPU host work measured at 5-20 us a byte, forty-ninth session). Also
        # captures: at 1 byte a run the CLI's generation never did (capture waits for a run of more than 4 bytes)
        sync_every = STREAM_CHUNK
        if runner.host_schedule and unroll > 1:  # span graphs read no flag: streamed too, in whole spans
            runner.unroll = unroll
            sync_every = -(-STREAM_CHUNK // unroll) * unroll
    first = max(sync_every, 5) if runner.want_graphs else sync_every
    first_run, read = None, 0
    t0 = time.perf_counter()
    for n, chunk in _decoded_chunks(runner, max_new_bytes, first, sync_every, _pipelined(dec.device)):
        read += n
        if first_run is None:  # the first run holds compiling and capturing: timed apart from the steady rest
            first_run = (n, time.perf_counter() - t0)
        for r, o in enumerate(outs):
            for b in chunk[r]:
                piece = o.push(b)
                if stream is not None and piece:
                    stream(r, piece)
        if all(o.done for o in outs):
            break
    if session is not None:  # only after a finished loop: an interrupted one leaves its state unknown
        # the switches read again: building the decoder may have imported a kernel module (the fused head is on by
        # default), and the next call's key, made before its take, reads them so
        session.keep(model, key[:-1] + (_kernel_switches(),), runner)
    # replayed at all: the graphs held at the end are gone after a growth whose last run was too short to capture
    info = {"steps": runner.n_done, "eager_steps": runner.eager_steps,
            "cuda_graphs": runner.n_done > runner.eager_steps}
    n_complete = getattr(runner.dec, "n_complete", None)  # ionLlama: patches over prompt and output
    if n_complete is not None and B == 1:  # the closed ones and the last, unless "completed" closed it already
        d = runner.dec
        patches = int(runner.patches_counted().sum()) + 1 - (int(d.next_start.sum()) if d.completed else 0)
        info.update(patches=patches, positions=int(d.t.sum()))
    if first_run is not None:  # host time, read after each run's bytes came back (a sync)
        info.update(setup_s=t0 - t_setup, first_run_steps=first_run[0], first_run_s=first_run[1],
                    rest_steps=read - first_run[0], rest_s=time.perf_counter() - t0 - first_run[1])
    return info
