"""The decode loop: sample -> (latent step if a patch closes) -> byte step, eagerly or replayed as
CUDA graphs.

One iteration, for every decoder:  tok = sample(logits, step); out[:, step] = tok;
logits = step(tok); step += 1. Decoders with a separate latent stage (ionLlama) run
``advance_latent()`` first when some row's next byte opens a patch. All state lives in fixed
tensors, so on CUDA the iteration is captured once as a graph (plus one for the latent stage) and
replayed: the per-byte cost becomes the GPU time of the kernels, not Python and launch overhead.
Optionally the stages are compiled with torch.compile before capture (fewer, fused kernels).
Graph replay runs exactly the kernels of the eager iteration, so results do not depend on it.

With latent_shift "completed" (ionLlama) the latent stage sits inside the iteration, between the byte's
pooling and its decoder: three byte parts (entropy + patch flag; embedding, encoder, pooling; decoder,
head), the flag read by the host after the first part as with 'early', and the latent graph replayed
between the second and third parts.

At batch <= 2 (latent_policy 'skip') the host reads a one-element flag, set inside the byte graph,
after every byte to decide whether to replay the latent graph: one host sync and two graph launches
per byte. Capture happens on the first ``run`` that asks for more than 4 bytes: 3 real
iterations run eagerly first as warm-up (their bytes are output and count toward that ``run``), then
both stages are recorded, which runs nothing. For that, decode steps write their state in place and
have no host reads (``dec.capturable``). If capture fails, ``run`` raises a RuntimeError rather than
carrying on eagerly: torch can leave its CUDA state altered after a failed capture (e.g. the current
stream), so continuing would not be known to give the same bytes.
"""
from __future__ import annotations

import contextlib
import gc

import torch
import torch._inductor.config  # noqa: F401  (COMPILE_PRESETS asks it which settings exist)

from ..devices import reusable_stream
from ..errors import UserError
from .decoding import grown, shape_bucket
from .sampling import NoiseSource, SamplingConfig, row_keys, sample_next

@contextlib.contextmanager
def no_gc_during_capture():
    """Python's cyclic collector off while a graph is captured. A runner sits in reference cycles (its lists of bound
    methods), so an earlier generate()'s runner is freed by the collector, whenever it runs: during a capture, its
    CUDA graphs' destruction is an operation CUDA refuses while a stream captures, and the capture fails ("operation
    not permitted when stream is capturing (function reset)", then cudaErrorStreamCaptureInvalidated) or the process
    aborts (H100, fifty-first session: the second of several generate() calls in one process).
    torch.cuda.graph collects once before capture_begin; nothing is collected after that until the capture ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# host_schedule with unroll > 1: at most this many span graphs (latent patterns) are captured per capture
MAX_SPAN_GRAPHS = 8

# CUDA graph conditional nodes (torch's CUDAGraph.begin_capture_to_if_node): what DecodeRunner's unroll needs
_HAS_IF_NODES = hasattr(getattr(torch._C, "_CUDAGraph", None), "begin_capture_to_if_node")

# torch.compile settings for the decode step, by name. The step is a few hundred tiny kernels, so what
# counts is how many there are: "max-autotune" adds GEMM autotuning (Triton GEMMs that fuse their
# neighbours) and inductor's horizontal fusion of independent kernels (combo_kernels). On an H200 it gave
# 5,451-6,386 bytes/s at batch 1 against 4,631-4,759 for "default", for ~2 min of compiling instead of
# ~25 s (docs/results/generation.md); with today's fused steps on an H100, 10,185-10,232 against 9,806-10,018
# (docs/results/checks-s59.md). CUDA graphs are ours (the runner captures), hence not inductor's.
# Neither turns on inductor's programmatic dependent launch (triton.enable_pdl; it was on in both until
# session 56): torch 2.11's inductor loads a compiled function's scalar inputs (the position t, patch flags) before
# the kernel's gdc_wait, i.e. while the kernel before it, from another compiled function that may write them, can
# still run. On an H100 the overlapped latent step's byte parts then read stale state: sampled bytes differed from
# eager in 3 of 4 seeds (docs/results/checks-s56.md). Our own Triton kernels keep PDL: they load only weights
# before their wait (kernels/pdl.py). The presets set it off explicitly, so that TORCHINDUCTOR_ENABLE_PDL=1 in the
# environment cannot turn it back on; profile_decode_step.py's --inductor_pdl on (experiments only) sets _PDL.
_PDL = {"triton.enable_pdl": True} if hasattr(torch._inductor.config.triton, "enable_pdl") else {}
_NO_PDL = {k: False for k in _PDL}
COMPILE_PRESETS = {
    "default": dict(_NO_PDL),
    "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True, "combo_kernels": True, **_NO_PDL},
}


def compile_options(setting) -> dict | None:
    """generate()'s ``compile``: False/None -> None (eager); True -> {}; a COMPILE_PRESETS name -> its options."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return dict(COMPILE_PRESETS["default"])
    if isinstance(setting, str) and setting in COMPILE_PRESETS:
        return dict(COMPILE_PRESETS[setting])
    raise UserError(f"compile must be True, False or one of {', '.join(COMPILE_PRESETS)}; got {setting!r}")


def check_unroll(unroll) -> int:
    """DecodeRunner's / generate()'s unroll: a whole number >= 1, else a one-line UserError."""
    if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 1:
        raise UserError(f"unroll must be a whole number of bytes per graph launch, >= 1; got {unroll!r}")
    return unroll


def entropy_branch_possible(dec) -> bool:
    """Can the entropy model run on a second stream beside the local layers? ionLlama's cached decoder with entropy
    patching (DecodeRunner adds: under the 'early' latent policy, the "completed" shift only)."""
    return hasattr(dec, "advance_latent") and bool(getattr(dec, "use_entropy", False)) and \
        hasattr(dec, "next_patch_flag")


def overlap_latent_possible(dec) -> bool:
    """Can the runner overlap the latent step with the bytes around it (overlap_latent)? ionLlama with fixed patching
    (the host knows the patch ends) and latent_shift "previous" (the byte after a patch is the first to need it)."""
    fixed = getattr(getattr(dec, "cfg", None), "patching", None) == "fixed"
    return hasattr(dec, "advance_latent") and hasattr(dec, "latent_stage") and fixed \
        and not getattr(dec, "completed", False) and not getattr(dec, "lagged", False)


def no_overlap_latent() -> UserError:
    return UserError("overlap_latent needs ionLlama with fixed patching and latent_shift 'previous' (the host must "
                     "know the patch ends, and the byte after a patch must be the first to see it); leave it off")


def no_overlap_with_unroll() -> UserError:
    return UserError("overlap_latent replays a byte's graphs one at a time, so unroll > 1 does not combine with it; "
                     "use unroll=1 or overlap_latent=False")


def no_entropy_branch() -> UserError:
    return UserError("entropy_branch is for ionLlama with entropy patching (and, under the 'early' latent policy, "
                     "latent_shift \"completed\"); this model cannot use it: leave it off")


def resolve_latent_policy(policy: str, batch: int) -> str:
    """DecodeRunner's latent_policy "auto": 'skip' (read the flag, run the latent stage when needed) for batch <= 2,
    else 'always'. Anything else is kept."""
    return ("skip" if batch <= 2 else "always") if policy == "auto" else policy


class GraphCaptureError(RuntimeError):
    """A failed CUDA graph capture (run() raises it, the capture's own error as its __cause__): callers that offer a
    way around it (the CLI's --cuda_graphs off) can tell it from other RuntimeErrors."""


class DecodeRunner:
    def __init__(self, dec, cfg: SamplingConfig, seeds: torch.Tensor, logits: torch.Tensor, max_new: int,
                 cuda_graphs: bool = False, compile=False, latent_policy: str = "auto",
                 compile_mode: str | None = None, entropy_branch: bool | str = "auto", unroll: int = 1,
                 host_schedule: bool | str = "auto", prompt_len: int | None = None,
                 overlap_latent: bool | str = "auto"):
        """logits: the prefill's (B, V) next-byte logits. latent_policy: 'skip' (read the patch flag on
        the host each byte and run the latent stage only when a row opens a patch), 'always' (run it
        every byte with a masked commit: no host sync, better for large batches), 'early' (as skip, but the
        byte stage runs as two graphs, the entropy model and patch flag first: the host reads the flag
        while the GPU runs the rest of the byte; ionLlama only, else skip; with latent_shift "completed" the
        same as skip, which reads the flag that way there), 'auto' (skip for batch <= 2).
        compile: False, True or a COMPILE_PRESETS name; compile_mode: torch.compile's mode instead (with
        compile=True; for benchmarks). cuda_graphs is ignored for decoders that say they cannot be
        captured (``capturable = False``, e.g. RecomputeDecoder). entropy_branch: on CUDA the entropy model
        runs on a second stream beside the local layers, inside the one byte graph (ionLlama with entropy
        patching, any latent_shift, latent policy skip / always; True elsewhere is a UserError).
        The two share no written tensor (ionllama_decoder.begin_byte). "auto": on where it can be, on CUDA, for
        batch <= 2 (H200, batch 1, same bytes: byte graph 0.101 -> 0.086 ms; "completed" 0.146 -> 0.129-0.135 ms
        per byte; docs/results/generation.md). May be switched later (``can_branch``): the next capture or eager
        iteration uses the current setting.
        unroll: with CUDA graphs, also capture ``unroll`` iterations as one graph, each one's latent stage a
        conditional graph node on the flag the previous byte set on the GPU (CUDA 12.4+; torch's
        CUDAGraph.begin_capture_to_if_node), so the host launches one graph per ``unroll`` bytes and reads no
        flag in between; run() replays it while that many bytes are left, the per-byte graphs for the rest and
        whenever GPU times are asked for. 1: off. "lagged" under 'skip' keeps its own overlapped replay (the
        unrolled graph would serialize its latent step), so there it is not captured. Memory: each IF body is
        captured on its own stream, so the latent stage's temporaries are held once per unrolled byte.
        With host_schedule, unroll needs no conditional node: the host knows which of the ``unroll`` bytes run the
        latent stage, so it captures one graph per such pattern (each phase's with the capture, any other at its
        first use, at most MAX_SPAN_GRAPHS; a fixed patch
        size dividing ``unroll`` gives one pattern per row phase) and replays it while ``unroll`` bytes are left
        (measured 3 % slower than one graph a byte on an H100, unroll=16: docs/results/checks-s51.md).
        host_schedule: fixed patching decides every patch boundary from positions alone, so the host can follow
        them (a copy of the decoder's position, last rule start and next-start flag per row, read once after
        prefill) instead of reading a flag from the GPU: each byte is then one graph (its latent stage, when a
        row needs it, inside the same graph) and the host never waits for the GPU. The latent stage runs only at
        bytes where some row needs it, whatever latent_policy says (its masked commit leaves the other rows).
        "auto": on for fixed patching with the "completed" shift under CUDA graphs (measured ~9 % faster on an
        H200, levers step pick), and wherever overlap_latent is on, else off; True needs fixed patching and a shift
        other than "lagged" (else a UserError).
        overlap_latent: latent_shift "previous" with fixed patching under CUDA graphs (it implies host_schedule): a
        byte that closes a patch stages the patch after its pooling, the latent step runs on a second stream while
        that byte's decoder and the next byte's sampling, entropy model and encoder run, and the next byte waits for
        it only before its decoder (see _replay_overlapped). Same bytes as without it. It replays a byte's graphs
        one at a time, so unroll > 1 does not combine with it (True with it: a UserError). "auto": on where it can
        be, under CUDA graphs, for batch <= 2 and unroll 1: compiled, 7,578-7,675 -> 9,280-9,463 bytes/s at batch 1
        from 1K to 32K of context, 9,905-9,959 with inductor's autotuning (H100, docs/results/checks-s56.md; the
        faster rows of session 54 ran with inductor's PDL, which changed sampled bytes: see COMPILE_PRESETS). True
        elsewhere is a UserError.
        prompt_len: the longest prompt, when the decoder was built for fewer than prompt_len + max_new + 1
        positions: run() then grows its caches (doubling, dec.grow) and the output buffer before the steps that
        need them, and captures its graphs again. None: the decoder holds every position already."""
        self.dec, self.cfg = dec, cfg
        B, dev = logits.shape[0], logits.device
        self.seeds = seeds = seeds.to(dev)  # the noise is made where the logits are
        self.noise = NoiseSource(seeds, logits.shape[-1])  # step-independent noise hashes, computed once
        self.logits = logits.clone()
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.step_no = torch.zeros((), dtype=torch.long, device=dev)
        self.prompt_len = prompt_len
        steps_held = max_new if prompt_len is None else max(0, min(max_new, dec.max_len - prompt_len - 1))
        # compiled: the output buffer's length is a shape of the compiled step too (shape_bucket says why)
        self.bucketed = compile_options(compile) is not None
        self.max_new = max_new
        self.out = torch.zeros(B, self._out_len(steps_held + 1), dtype=torch.long, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.n_done = 0
        self.eager_steps = 0  # iterations run eagerly (warm-up, or no graphs): the rest replayed a graph
        self.has_latent = hasattr(dec, "advance_latent")
        # latent_shift "completed": the latent stage runs inside the byte, after its pooling (3 byte parts)
        self.completed = self.has_latent and getattr(dec, "completed", False)
        latent_policy = resolve_latent_policy(latent_policy, B)
        # 'early': the byte stage in two parts (the entropy model and the patch flag first, then the rest),
        # so with graphs the host reads the flag while the GPU runs the rest of the byte
        self.split = (latent_policy == "early" or self.completed) and self.has_latent \
            and hasattr(dec, "byte_step_entropy")
        if latent_policy == "early" and (not self.split or self.completed):
            latent_policy = "skip"  # "completed" reads the flag after part 1 under 'skip' anyway
        self.latent_policy = latent_policy
        self.no_rows = torch.zeros(B, dtype=torch.bool, device=dev)
        # does the next iteration need the latent stage? (0-d bool set at the end of each iteration,
        # inside the byte graph: the host reads one flag instead of launching a reduction every byte)
        self.latent_pred = torch.zeros((), dtype=torch.bool, device=dev)
        self._set_pred()
        self._byte_parts = [self._iter_entropy, self._iter_encode, self._iter_decode] if self.completed \
            else [self._iter_entropy, self._iter_rest] if self.split else [self._iteration]
        self._latent_fn = dec.advance_latent if self.has_latent else None
        self.can_branch = entropy_branch_possible(dec) and (self.completed or not self.split)
        if entropy_branch == "auto":  # (measured faster for every shift, same bytes: see the docstring)
            entropy_branch = self.can_branch and logits.is_cuda and B <= 2
        elif entropy_branch not in (True, False):
            raise UserError(f"entropy_branch must be True, False or 'auto'; got {entropy_branch!r}")
        if entropy_branch and not self.can_branch:
            raise no_entropy_branch()
        self.entropy_branch = bool(entropy_branch)
        # the lagged shift's own overlapped replay is kept (see _replay_lagged)
        lagged = self.has_latent and bool(getattr(dec, "lagged", False))
        fixed = getattr(getattr(dec, "cfg", None), "patching", None) == "fixed"
        self.can_schedule = self.has_latent and not lagged and fixed
        self.want_graphs = cuda_graphs and logits.is_cuda and getattr(dec, "capturable", True)
        self.can_overlap = overlap_latent_possible(dec)
        unroll = check_unroll(unroll)
        if overlap_latent == "auto":  # (it yields to an explicit unroll > 1: their replays do not combine)
            overlap_latent = self.can_overlap and self.want_graphs and B <= 2 and host_schedule is not False \
                and unroll == 1
        elif overlap_latent not in (True, False):
            raise UserError(f"overlap_latent must be True, False or 'auto'; got {overlap_latent!r}")
        if overlap_latent and unroll > 1:
            raise no_overlap_with_unroll()
        if overlap_latent and host_schedule is False:
            raise UserError("overlap_latent follows the patch ends on the host (host_schedule); leave host_schedule on "
                            "or 'auto', or overlap_latent off")
        if overlap_latent and not self.can_overlap:
            raise no_overlap_latent()
        self.overlap = bool(overlap_latent)
        if self.overlap:
            host_schedule = True
        if host_schedule == "auto":
            # on where measured faster: fixed patching, the "completed" shift, CUDA graphs (H200, the Phase-1 picks:
            # 6,844 -> 7,415 and 7,582 -> 8,327 bytes/s, docs/results/generation.md); the "previous" shift alone:
            # untimed (with overlap_latent: on)
            host_schedule = bool(self.can_schedule and self.completed and self.want_graphs)
        elif host_schedule not in (True, False):
            raise UserError(f"host_schedule must be True, False or 'auto'; got {host_schedule!r}")
        self.host_schedule = False
        self._h = None  # the host's copy of the patcher state: (t, last_rule, next_start) per row
        self._h_next = None  # that state after the current byte (computed once per byte)
        self.set_host_schedule(host_schedule, recapture=False)
        # "completed": begin, then the entropy model beside embedding + encoder + pooling, joined before the latent
        # stage (which reads the flag) and the decoder; otherwise begin, entropy model beside the whole local step, end
        self._branch_fns = ([self._iter_begin, self._iter_flag, self._iter_encode] if self.completed else
                            [self._iter_begin, self._iter_flag, self._iter_local, self._iter_end]) \
            if self.can_branch else []
        # The streams that capture (and branch_stream, which joins captures) come from torch's high-priority stream
        # pool: in torch <= 2.12 each conditional node's body is captured on a stream from the low-priority pool
        # (32, round robin), which can wrap onto a stream still capturing and fail (pytorch issue 187893)
        # (kept across calls: each new stream costs a cuBLAS workspace torch never frees, see reusable_stream)
        self.branch_stream = reusable_stream(dev, "decode_branch", -1) if self.can_branch and logits.is_cuda else None
        self.capture_stream = reusable_stream(dev, "decode_capture", -1) if logits.is_cuda else None
        # latent_shift "lagged" under 'skip' with graphs: the latent step's compute part runs on latent_stream while
        # the next patch's bytes decode (its output is shown one patch later); see _replay_lagged
        self.lagged = lagged and not self.split
        self._lagged_fns = [dec.latent_commit, dec.latent_compute] if self.lagged else []
        side_latent = (self.lagged or self.overlap) and logits.is_cuda  # (overlap_latent: the same streams)
        self.latent_stream = reusable_stream(dev, "decode_latent") if side_latent else None
        # ... and the bytes on a high-priority stream, so that the SMs go to a byte's kernels first while the two
        # overlap (on the default stream, of the latent stream's priority, a byte graph ran 25 % longer overlapped:
        # docs/results/checks-s53.md)
        self.byte_stream = reusable_stream(dev, "decode_bytes", -1) if side_latent else None
        self.latent_capture_stream = reusable_stream(dev, "decode_capture_latent", -1) if side_latent else None
        self.overlap_priority = "bytes"  # (set_overlap_priority)
        # overlap_latent: a byte's encoder part, its decoder part, and the latent step's stage, show and compute
        self._ov_fns = [self._ov_encode, self._iter_decode, dec.latent_stage, dec.latent_show, dec.latent_compute] \
            if self.overlap else []
        self.ov_graphs = None  # overlap_latent: the graphs of _ov_pieces, captured with the others
        self._ov_pending_at = None  # n_done after a byte that staged a patch whose latent output is not shown yet
        # overlap_latent: a closing byte and the opening byte after it as one graph, the latent step forked inside it
        # (one launch for the two bytes instead of five; set before the capture). Off: equal bytes on an H100 and no
        # faster than the pieces (9,337-9,477 against 9,280-9,463 bytes/s compiled, docs/results/checks-s56.md)
        self.ov_pairs = False
        # fixed patching: the host knows which bytes open a patch, so the lagged replay reads no flag per byte
        self.lagged_host = self.lagged and fixed
        self._lag_h = None  # (n_done, host patcher state) where the last lagged replay stopped; None: read it again
        options = compile_options(compile)
        if options is not None:
            # torch.compile takes a mode or options, not both; a mode leaves inductor's PDL to its global setting
            if compile_mode and _PDL and torch._inductor.config.triton.enable_pdl:
                raise UserError("inductor's programmatic dependent launch is on (TORCHINDUCTOR_ENABLE_PDL=1?), which "
                                "gave wrong bytes in compiled decode steps (docs/results/checks-s56.md); turn it off "
                                "or use compile=... presets instead of compile_mode")
            kw = dict(mode=compile_mode) if compile_mode else dict(options=options or None)
            self._byte_parts = [torch.compile(f, dynamic=False, **kw) for f in self._byte_parts]
            self._branch_fns = [torch.compile(f, dynamic=False, **kw) for f in self._branch_fns]
            self._lagged_fns = [torch.compile(f, dynamic=False, **kw) for f in self._lagged_fns]
            if self._ov_fns:
                # the byte's first part as two compiled functions, the entropy model's and the encoder's, as the
                # "completed" parts are. (Split in session 55 while inductor's PDL, the cause found in session 56,
                # changed its bytes; kept: the measured form, docs/results/checks-s56.md)
                ent, enc = (torch.compile(f, dynamic=False, **kw) for f in (self._iter_entropy, self._iter_encode))
                self._ov_fns = [lambda: (ent(), enc())] + [torch.compile(f, dynamic=False, **kw)
                                                           for f in self._ov_fns[1:]]
            if self.has_latent:
                self._latent_fn = torch.compile(dec.advance_latent, dynamic=False, **kw)
        # 'early' with graphs: the flag lands in host memory from inside the first part's graph
        self.pred_host = torch.zeros(1, dtype=torch.bool, pin_memory=logits.is_cuda) if self.split else None
        self.graphs = None
        self.lag_graphs = None  # "lagged": (commit, compute) graphs, captured with the others
        self.unroll = check_unroll(unroll)
        self.sched_graphs = None  # host_schedule: (byte, byte with its latent stage), one graph each
        self.span_graphs = {}  # host_schedule with unroll > 1: latent pattern of `unroll` bytes -> their graph
        self._pool = None  # the graph memory pool of the last capture (span graphs are captured into it later)
        self.multi_graph = None  # the `unroll` iterations as one graph, captured with the others
        self.multi_k = 0  # iterations in multi_graph
        self._check_unroll()

    def _wants_unrolled(self) -> bool:
        # (host_schedule needs no flag on the GPU between bytes: nothing to unroll)
        return self.want_graphs and self.unroll > 1 and not (self.lagged and self.latent_policy == "skip") \
            and not self.host_schedule

    def _check_unroll(self) -> None:
        if self._wants_unrolled() and self.has_latent and self.latent_policy != "always" and not _HAS_IF_NODES:
            raise UserError("unroll > 1 needs CUDA graph conditional nodes (torch.cuda.CUDAGraph."
                            "begin_capture_to_if_node, CUDA 12.4+), which this torch lacks; use unroll=1")

    def _set_pred(self) -> None:
        if self.has_latent:
            self.latent_pred.copy_(self.dec.next_start.any())

    def restart(self, logits: torch.Tensor, seeds: torch.Tensor, max_new: int, prompt_len: int | None) -> None:
        """A new generation on the same decoder, prefilled again in place (generate's DecodeSession): new seeds
        (written into the tensors the graphs read), output length and prompt length; captured graphs and
        compiled steps stay. The caches grow, and the graphs are captured again, only if the new call needs it."""
        self.seeds.copy_(seeds.to(self.seeds.device))
        self.noise.keys.copy_(row_keys(self.seeds))
        self.max_new, self.prompt_len = max_new, prompt_len
        if len(self.span_graphs) >= MAX_SPAN_GRAPHS:  # other prompts, other row phases: make room for their patterns
            self.span_graphs = {}
        self.reset(logits)

    def reset(self, logits: torch.Tensor) -> None:
        """Start over after the decoder was prefilled again (in place): captured graphs stay valid."""
        self.logits.copy_(logits)
        self.step_no.zero_()
        self.out.zero_()
        self._set_pred()
        self._sync_schedule()
        self._lag_h = None
        self._ov_pending_at = None  # (prefill set the patch counts again: nothing to undo)
        self.n_done = 0
        self.eager_steps = 0

    # ---------------------------------------------------------------- host_schedule: the patcher on the host
    def set_host_schedule(self, on: bool, recapture: bool = True) -> None:
        """Switch host_schedule (benchmarks' A/B); the next capture or eager iteration follows it."""
        if on and not self.can_schedule:
            raise UserError("host_schedule needs ionLlama with fixed patching (other patchings decide boundaries "
                            "from the bytes, on the GPU) and a latent_shift other than 'lagged'; leave it off")
        self.host_schedule = bool(on)
        if recapture:
            self.graphs = None
        self._sync_schedule()

    def _sync_schedule(self) -> None:
        """Copy the decoder's patcher state to the host (one read, after prefill)."""
        if self.host_schedule:
            self._h = self._read_patcher_state()

    def _read_patcher_state(self) -> tuple[list, list, list]:
        """(t, last_rule, next_start) per row, read from the decoder (a sync)."""
        d = self.dec
        return d.t.tolist(), d.last_rule.tolist(), d.next_start.tolist()

    def _host_after(self, h=None) -> tuple[list, list]:
        """(last_rule, next_start) per row after the byte at each row's position t (of state h, default the
        current one): next_patch_flag's fixed rule in integers (ionllama_decoder: a start every fixed_patch_size
        positions, capped at max_patch_size)."""
        cfg = self.dec.cfg
        k, cap = cfg.fixed_patch_size, cfg.max_patch_size
        last, nxt = [], []
        for t, lr in zip(*(h or self._h)[:2]):
            tn = t + 1
            rule = tn % k == 0
            lr = tn if rule else lr
            last.append(lr)
            nxt.append(rule or (tn - lr) % cap == 0)
        return last, nxt

    def _host_need(self) -> bool:
        """Does this byte run the latent stage? "previous": some row's byte opens a patch (the flag the last
        byte set); "completed": some row's byte closes one (the flag this byte sets)."""
        self._h_next = self._host_after()
        return any(self._h_next[1]) if self.completed else any(self._h[2])

    def _host_advance(self) -> None:
        last, nxt = self._h_next if self._h_next is not None else self._host_after()
        self._h, self._h_next = ([t + 1 for t in self._h[0]], last, nxt), None

    def _host_pattern(self, k: int, h=None) -> tuple[tuple, tuple]:
        """The next k bytes' latent needs (as _host_need says each) and the host state after them, from state h
        (default the current one), which stays unchanged."""
        h, need = (self._h if h is None else h), []
        for _ in range(k):
            last, nxt = self._host_after(h)
            need.append(any(nxt) if self.completed else any(h[2]))
            h = ([t + 1 for t in h[0]], last, nxt)
        return tuple(need), h

    # ---------------------------------------------------------------- one iteration (graph body)
    def _iteration(self) -> None:
        tok = sample_next(self.logits, self.cfg, self.seeds, self.step_no, self.noise)
        self.tok.copy_(tok)
        # index_put_, not scatter_: torch.compile keeps it in place (see slots.py)
        self.out.index_put_((self.rows, self.step_no.expand(tok.shape[0])), tok)
        step = self.dec.byte_step if self.has_latent else self.dec.step
        self.logits.copy_(step(self.tok))
        self._set_pred()
        self.step_no += 1

    def _iter_begin(self) -> None:
        """entropy_branch, before the fork: sample the byte, mark whether it opens a patch."""
        tok = sample_next(self.logits, self.cfg, self.seeds, self.step_no, self.noise)
        self.tok.copy_(tok)
        self.out.index_put_((self.rows, self.step_no.expand(tok.shape[0])), tok)
        self.dec.begin_byte()

    def _iter_flag(self) -> None:
        """entropy_branch, second stream: the entropy model and the next byte's patch flag."""
        self.dec.next_patch_flag(self.tok)
        self._set_pred()

    def _iter_local(self) -> None:
        """entropy_branch, first stream: embedding, encoder, pooling, decoder, head."""
        self.logits.copy_(self.dec.byte_step_local(self.tok))

    def _iter_end(self) -> None:
        self.dec.end_byte()
        self.step_no += 1

    def _fork(self, side, main_fn) -> None:
        """side() on branch_stream beside main_fn() on the current stream, joined after both (CUDA; in order on
        CPU). Captured, the fork and join become edges of the one graph."""
        if self.branch_stream is None:
            side()
            main_fn()
            return
        main = torch.cuda.current_stream()
        self.branch_stream.wait_stream(main)
        with torch.cuda.stream(self.branch_stream):
            side()
        main_fn()
        main.wait_stream(self.branch_stream)

    def _iteration_branched(self) -> None:
        """One byte as _iteration, the entropy model forked onto branch_stream and joined before the position
        advances."""
        begin, flag, local, end = self._branch_fns
        begin()
        self._fork(flag, local)
        end()

    def _completed_branched(self) -> None:
        """"completed", parts 1 and 2 as one: the entropy model (and the flag) beside embedding, encoder and
        pooling; the latent stage and part 3 follow."""
        begin, flag, encode = self._branch_fns
        begin()
        self._fork(flag, encode)

    def _parts(self) -> list:
        """The byte stage's parts under the current setting (entropy_branch may be switched between runs)."""
        if not (self.entropy_branch and self.can_branch):
            return self._byte_parts
        return [self._completed_branched, self._byte_parts[2]] if self.completed else [self._iteration_branched]

    def _latent_at(self) -> int:
        """Index of the byte part the latent stage runs before: "completed" before the decoder part (the third
        part, or the second with the branch), else before the byte."""
        if not self.completed:
            return 0
        return 1 if self.entropy_branch and self.can_branch else 2

    def _iter_entropy(self) -> None:
        """'early', part 1: sample the byte, run the entropy model on it, set the next byte's patch flag."""
        tok = sample_next(self.logits, self.cfg, self.seeds, self.step_no, self.noise)
        self.tok.copy_(tok)
        self.out.index_put_((self.rows, self.step_no.expand(tok.shape[0])), tok)
        self.dec.byte_step_entropy(self.tok)
        self._set_pred()

    def _iter_rest(self) -> None:
        """'early', part 2: the rest of the byte step."""
        self.logits.copy_(self.dec.byte_step_rest(self.tok))
        self.step_no += 1

    def _iter_encode(self) -> None:
        """"completed", part 2: embedding, encoder, pooling (the latent stage may follow)."""
        self.dec.byte_step_encode(self.tok)

    def _iter_decode(self) -> None:
        """"completed", part 3: decoder and head, with the latent of the patch this byte closed, if any."""
        self.logits.copy_(self.dec.byte_step_decode(self.tok))
        self.step_no += 1

    def _ov_encode(self) -> None:
        """overlap_latent, a byte's first part: sample it, the entropy model, embedding, encoder, pooling."""
        self._iter_entropy()
        self._iter_encode()

    # ---------------------------------------------------------------- overlap_latent ("previous", fixed patching)
    def _ov_pieces(self) -> dict:
        """The pieces of a byte under overlap_latent, as functions; once captured, each is a graph of that name."""
        encode, decode, stage, show, compute = self._ov_fns
        nxt = self.dec.next_start
        return {"latent": lambda: self._latent_fn(nxt), "byte": lambda: self._scheduled_byte(False),
                "encode": encode, "encode_stage": lambda: (encode(), stage(nxt)),
                "show_decode": lambda: (show(), decode()), "show_stage": lambda: (show(), stage(nxt)),
                "decode": decode, "compute": compute}

    def _overlap_byte(self, run, streams) -> None:
        """One byte under overlap_latent. run(name) runs a piece of _ov_pieces; streams: (the bytes', the latent
        step's), or None to run everything in order. Rows whose byte closes a patch (the host's schedule says
        which) stage it after the pooling and the latent step is computed on the latent stream; the next byte
        (which opens a patch for those rows) runs its encoder first, then waits for that step, shows its output
        and runs its decoder. A byte that opens a patch no staged step covers (the last byte ran another path)
        runs the latent step first, as "previous" does."""
        h = self._h
        last, nxt = self._host_after()
        opens, closes = any(h[2]), any(nxt)
        show = opens and self._ov_pending_at == self.n_done
        if opens and not show:
            run("latent")
        if show:
            run("encode")
            if streams is not None:
                streams[0].wait_stream(streams[1])
            run("show_stage" if closes else "show_decode")
        elif closes:
            run("encode_stage")
        else:
            run("byte")
        if closes:
            if streams is None:
                run("compute")
            else:
                streams[1].wait_stream(streams[0])
                with torch.cuda.stream(streams[1]):
                    run("compute")
            run("decode")
        self._h, self._h_next = ([t + 1 for t in h[0]], last, nxt), None
        self.n_done += 1
        self._ov_pending_at = self.n_done if closes else None

    def _ov_pair(self) -> None:
        """overlap_latent, two bytes in one graph: a byte that closes a patch (staged after its encoder), the latent
        step forked onto latent_stream beside that byte's decoder and the next byte's encoder, joined before the
        next byte's show and decoder. As _overlap_byte twice, for a byte that closes and a next one that does not."""
        encode, decode, stage, show, compute = self._ov_fns
        main, side = torch.cuda.current_stream(), self.latent_stream
        encode()
        stage(self.dec.next_start)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            compute()
        decode()
        encode()
        main.wait_stream(side)
        show()
        decode()

    def set_overlap_priority(self, first: str) -> None:
        """overlap_latent: which replay stream has the high priority. "bytes" (default): as for "lagged", where the
        latent step has a whole patch of bytes to hide behind. "latent": there the latent step is the critical path
        when it is longer than what it overlaps (on an H100 the pick's latent graph took 0.149 ms, a byte graph
        0.077 and 0.089 GPU ms a byte in all, autotuned, checks-s56), so its kernels may go first. A graph replays
        at its stream's priority, so this takes effect at the next replay, without a new capture. Measured: no
        difference (H100, autotuned, two runs in swapped order, docs/results/checks-s57.md), so "bytes" stays."""
        if first not in ("bytes", "latent"):
            raise UserError(f"overlap priority must be 'bytes' or 'latent'; got {first!r}")
        self.overlap_priority = first
        if self.latent_stream is None or not self.overlap:
            return
        dev = self.out.device
        hi, lo = (-1, 0) if first == "bytes" else (0, -1)  # (bytes' priority, latent's): lower is higher
        self.byte_stream = reusable_stream(dev, "decode_bytes", hi)
        self.latent_stream = reusable_stream(dev, "decode_latent", lo)

    def _pair_fits(self, target: int) -> tuple | None:
        """The host state after two bytes if they can run as the pair graph: this byte closes a patch and opens none
        (no staged step to show, none to run first), the next one closes none, and both are within target."""
        h = self._h
        if self.ov_graphs is None or "pair" not in self.ov_graphs or target - self.n_done < 2 or any(h[2]):
            return None
        last, nxt = self._host_after(h)
        if not any(nxt):
            return None
        h1 = ([t + 1 for t in h[0]], last, nxt)
        last1, nxt1 = self._host_after(h1)
        return None if any(nxt1) else ([t + 2 for t in h[0]], last1, nxt1)

    def patches_counted(self) -> torch.Tensor:
        """The decoder's completed-patch count per row as the plain path would have it: a patch staged by the
        overlapped replay counts already on the GPU, but on the plain path its step runs before the next byte."""
        n = self.dec.n_complete
        return n - self.dec.mask_buf.long() if self._ov_pending_at is not None else n

    def _settle_overlap(self) -> None:
        """Before any path but the overlapped replay: a patch staged and counted whose output is not shown yet is
        uncounted, so that the next byte runs its latent step again the plain way (the staged step's KV slot is
        written again with it). The replay joined the latent stream into the caller's, so its compute is done
        before anything queued after it."""
        if self._ov_pending_at is not None:
            self.dec.n_complete.sub_(self.dec.mask_buf.long())
            self._ov_pending_at = None

    def _replay_overlapped(self, target: int, timed) -> None:
        """overlap_latent: _overlap_byte on graphs, the bytes on byte_stream and the compute on latent_stream,
        joined before returning (as _replay_lagged). A staged step still to show is kept for the next call."""
        graphs, outer, side = self.ov_graphs, torch.cuda.current_stream(), self.latent_stream
        main = self.byte_stream or outer
        if main is not outer:
            main.wait_stream(outer)
        run = lambda name: self._replay(graphs[name], name, timed)  # noqa: E731  (one closure, not one a byte)
        try:
            with torch.cuda.stream(main):
                while self.n_done < target:
                    h2 = self._pair_fits(target) if self.ov_pairs else None
                    if h2 is not None:
                        self._replay(graphs["pair"], "pair", timed)
                        self._h, self._h_next, self._ov_pending_at = h2, None, None
                        self.n_done += 2
                        continue
                    self._overlap_byte(run, (main, side))
        finally:
            main.wait_stream(side)
            if main is not outer:
                outer.wait_stream(main)

    def _unrolled_body(self, when, k: int) -> None:
        """k iterations as _eager_once does them; when(fn) runs the latent stage where the flag says so
        (a conditional graph node under capture, _when_eager otherwise; unconditionally under 'always')."""
        at = self._latent_at()
        latent = lambda: self._latent_fn(self.dec.next_start)  # noqa: E731
        for _ in range(k):
            for i, part in enumerate(self._parts()):
                if i == at and self.has_latent:
                    latent() if self.latent_policy == "always" else when(latent)
                part()

    def _when_eager(self, fn) -> None:
        if bool(self.latent_pred):
            fn()

    def _record_unrolled(self, pool) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()

        def when(fn):  # an IF node: its body runs on the GPU only if latent_pred holds when the node is reached
            g.begin_capture_to_if_node(self.latent_pred)
            try:
                fn()
            finally:
                g.end_capture_to_conditional_node()
        with no_gc_during_capture(), torch.cuda.graph(g, pool=pool, stream=self.capture_stream):
            self._unrolled_body(when, self.unroll)
        return g

    def _latent_needed(self) -> bool:
        if not self.has_latent:
            return False
        return self.latent_policy == "always" or bool(self.latent_pred)

    def _eager_once(self) -> None:
        # "previous": the latent stage before the byte (flag set by the last byte); "completed": before
        # the byte's decoder (flag set by this byte's part 1)
        self._lag_h = None  # (the lagged replay's host state does not follow eager steps)
        self._settle_overlap()
        at = self._latent_at()
        need = self._host_need() if self.host_schedule else None
        for i, part in enumerate(self._parts()):
            if i == at and (need if need is not None else self._latent_needed()):
                self._latent_fn(self.dec.next_start)  # always called with the mask: one compiled signature
            part()
        if self.host_schedule:
            self._host_advance()
        self.n_done += 1
        self.eager_steps += 1

    def _scheduled_byte(self, with_latent: bool) -> None:
        """host_schedule: one byte, all its parts, with the latent stage where the shift puts it."""
        at = self._latent_at()
        for i, part in enumerate(self._parts()):
            if i == at and with_latent:
                self._latent_fn(self.dec.next_start)
            part()

    def _warm_up(self) -> None:
        """Up to 3 real iterations, 4 with overlap_latent (lazy inits, compilation, cuBLAS handles), on a side stream:
        they sample bytes into self.out and count in n_done like any other. Then the latent stage twice
        with no row committing, which leaves the state as it was (the slot it writes is not valid
        yet and is rewritten before it is read)."""
        side = reusable_stream(self.out.device, "warm_up")
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(min(3, self.max_new - self.n_done)):
                self._eager_once()
            if self.has_latent:
                for _ in range(2):
                    self._latent_fn(self.no_rows)
                    if self.lagged:  # the two parts too (their compiled code): no row commits either
                        self._lagged_fns[0](self.no_rows)
                        self._lagged_fns[1]()
            if self.overlap and self.host_schedule:  # (its parts follow the host's patcher state)
                # overlap_latent's parts (their compiled code): a real byte through encode and decode, the plain way
                # (nothing staged), then the latent step's three parts with no row staged (nothing changes)
                encode, decode, stage, show, compute = self._ov_fns
                self._settle_overlap()
                if self.n_done < self.max_new:
                    if any(self._h[2]):
                        self._latent_fn(self.dec.next_start)
                    encode()
                    decode()
                    self._host_advance()
                    self.n_done += 1
                    self.eager_steps += 1
                stage(self.no_rows)
                compute()
                show()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def _record(self, fn, pool) -> torch.cuda.CUDAGraph:
        """Capture fn() into a new graph. Capture only records kernels: nothing runs, state is untouched."""
        g = torch.cuda.CUDAGraph()
        with no_gc_during_capture(), torch.cuda.graph(g, pool=pool, stream=self.capture_stream):
            fn()
        return g

    def _record_beside(self, fn) -> torch.cuda.CUDAGraph:
        """Capture a latent compute graph that replays while byte graphs run ("lagged", overlap_latent): a pool of its
        own, so no temporary of one can share memory with the other's (graphs that share a pool must replay one after
        the other), and a capture stream of its own: torch gives each stream its own cuBLAS workspace, and a graph
        keeps the one of its capture stream, so the two graphs' GEMMs do not share one while they overlap."""
        main_capture, self.capture_stream = self.capture_stream, self.latent_capture_stream
        try:
            return self._record(fn, torch.cuda.graph_pool_handle())
        finally:
            self.capture_stream = main_capture

    def _capture(self) -> None:
        self._check_unroll()  # (unroll may have been set after construction)
        self.multi_graph = None
        self.sched_graphs = None  # (host_schedule may have been switched since the last capture)
        self.ov_graphs = None
        self.span_graphs = {}
        self._warm_up()
        stream = torch.cuda.current_stream()
        try:
            pool = self._pool = torch.cuda.graph_pool_handle()
            parts = list(self._parts())
            if self.split:  # the flag to host memory, inside the first part's graph
                first = parts[0]
                parts[0] = lambda: (first(), self.pred_host.copy_(self.latent_pred.view(1), non_blocking=True))
            if self.host_schedule:  # two whole-byte graphs instead of the parts and the latent stage
                self.sched_graphs = (self._record(lambda: self._scheduled_byte(False), pool),
                                     self._record(lambda: self._scheduled_byte(True), pool))
                g_bytes, g_lat = [], None
                self._prime_spans()
            else:
                g_bytes = [self._record(f, pool) for f in parts]
                g_lat = self._record(lambda: self._latent_fn(self.dec.next_start), pool) if self.has_latent else None
            if self.overlap and self.host_schedule:
                pieces = self._ov_pieces()
                self.ov_graphs = {k: self._record(f, pool) for k, f in pieces.items() if k != "compute"}
                if self.ov_pairs and self.latent_stream is not None:  # (the fork needs a second stream)
                    self.ov_graphs["pair"] = self._record(self._ov_pair, pool)
                self.ov_graphs["compute"] = self._record_beside(pieces["compute"])
            if self.lagged:
                commit, compute = self._lagged_fns
                g_commit = self._record(lambda: commit(self.dec.next_start), pool)
                self.lag_graphs = (g_commit, self._record_beside(compute))
            if self._wants_unrolled():
                self.multi_graph = self._record_unrolled(pool)
                self.multi_k = self.unroll  # what the graph holds, whatever unroll is set to later
        except GraphCaptureError:  # (a span graph's, said already)
            raise
        except Exception as e:
            raise self._capture_failed(e, stream) from e
        self.graphs = (g_bytes, g_lat)

    def _capture_failed(self, e: Exception, stream) -> GraphCaptureError:
        # torch.cuda.graph does not restore the current stream when ending a failed capture raises
        torch.cuda.set_stream(stream)
        return GraphCaptureError(
            f"capturing the decode step as a CUDA graph failed ({type(e).__name__}: {str(e)[:300]}); "
            f"decode with cuda_graphs=False. {self.n_done} bytes were decoded before the capture "
            "(warm-up, or replays before a span graph's first use); a failed capture can leave torch's CUDA state "
            "altered, so decoding does not continue from there")

    @torch.no_grad()
    def run(self, n: int, gpu_ms: dict | None = None) -> None:
        """Advance n iterations (n bytes sampled into self.out); never past max_new. gpu_ms: a dict to
        receive the GPU time of each graph replay, from CUDA events around it: {'byte': [ms, ...],
        'latent': [...]}, and 'byte_rest' for the later parts of a split byte stage ('early', latent_shift
        "completed"); with host_schedule 'byte' and 'byte_latent' (a byte whose graph holds the latent stage). For benchmarks: the wall time per byte minus these is the time the GPU waited for
        the host."""
        # on the model's GPU, which need not be the current device (--device cuda:1; generate sets none): every
        # current_stream(), event and synchronize() below is that device's (capture_stream: CUDA runners only)
        if self.capture_stream is not None:
            with torch.cuda.device(self.out.device):
                self._run(n, gpu_ms)
        else:
            self._run(n, gpu_ms)

    def _run(self, n: int, gpu_ms: dict | None) -> None:
        target = min(self.max_new, self.n_done + n)
        if self.prompt_len is not None:
            self._reserve(target)
        if self.want_graphs and self.graphs is None and target - self.n_done > 4:
            self._capture()  # its warm-up iterations count toward target
        timed = [] if gpu_ms is not None and self.graphs is not None else None
        while self.n_done < target and self.graphs is None:
            self._eager_once()
        if self.n_done >= target:
            return
        g_bytes, g_lat = self.graphs
        if self.multi_graph is not None and timed is None:
            self._lag_h = None
            while target - self.n_done >= self.multi_k:
                self.multi_graph.replay()
                self.n_done += self.multi_k
            if self.n_done >= target:
                return
        if self.overlap and self.host_schedule and self.ov_graphs is not None:
            self._replay_overlapped(target, timed)
            return self._gpu_times(timed, gpu_ms)
        self._settle_overlap()
        if self.host_schedule and self.sched_graphs is not None:
            self._replay_scheduled(target, timed)
        elif self.completed:
            self._replay_completed(target, g_bytes, g_lat, timed)
        elif self.lag_graphs is not None and self.latent_policy == "skip":
            self._replay_lagged(target, g_bytes, timed)
        else:
            self._lag_h = None  # (a lagged runner switched to another latent_policy)
            self._replay_previous(target, g_bytes, g_lat, timed)
        self._gpu_times(timed, gpu_ms)

    @staticmethod
    def _gpu_times(timed, gpu_ms) -> None:
        if timed:
            torch.cuda.synchronize()
            for kind, a, b in timed:
                gpu_ms.setdefault(kind, []).append(a.elapsed_time(b))

    def _out_len(self, size: int) -> int:
        """Length of the output buffer for `size` entries: bucketed when compiled, else capped at what max_new
        can need."""
        return shape_bucket(size) if self.bucketed else min(self.max_new + 1, size)

    def _reserve(self, target: int) -> None:
        """Room for steps up to `target`: the decoder's caches (prompt_len + target + 1 positions: the last step
        also feeds its byte) and the output buffer, each doubled when short (capped at what max_new can need;
        compiled: to the next shape_bucket, uncapped). A graph holds the old tensors, so the graphs are captured
        again by the next run (and a compiled step compiles again for the new shapes)."""
        full = self.prompt_len + self.max_new + 1
        need = self.prompt_len + target + 1
        grew = False
        if need > self.dec.max_len:
            size = max(need, 2 * self.dec.max_len)
            grew = self.dec.grow(shape_bucket(size) if self.bucketed else min(full, size))
        if target + 1 > self.out.shape[1]:
            self.out = grown(self.out, 1, self._out_len(max(target + 1, 2 * self.out.shape[1])))
            grew = True
        if grew:
            self.graphs = self.lag_graphs = self.multi_graph = self.sched_graphs = self.ov_graphs = None
            self.span_graphs = {}

    def _replay_scheduled(self, target: int, timed) -> None:
        """host_schedule: one graph per byte, chosen on the host; no flag read, no wait for the GPU. With unroll > 1
        (and no GPU times asked for), one graph per `unroll` bytes while that many are left."""
        g_byte, g_with_latent = self.sched_graphs
        while self.n_done < target:
            if self.unroll > 1 and timed is None and target - self.n_done >= self.unroll:
                need, h_after = self._host_pattern(self.unroll)
                g = self._span_graph(need)
                if g is not None:
                    g.replay()
                    self._h, self._h_next = h_after, None
                    self.n_done += self.unroll
                    continue
            if self._host_need():
                self._replay(g_with_latent, "byte_latent", timed)
            else:
                self._replay(g_byte, "byte", timed)
            self._host_advance()
            self.n_done += 1

    def _prime_spans(self) -> None:
        """With unroll > 1, record now the span graphs of the patterns that start at each of the next
        fixed_patch_size bytes (the rule repeats with that period), so that replays do not stop to capture: each
        capture synchronizes the device and collects garbage first (recorded at first use inside a timed span, the
        span rows of an H100 sweep ran 0.158 ms a byte against 0.120 without spans, fifty-first session)."""
        if self.unroll <= 1:
            return
        h = self._h
        for _ in range(self.dec.cfg.fixed_patch_size):
            need, _ = self._host_pattern(self.unroll, h)
            self._span_graph(need)
            last, nxt = self._host_after(h)
            h = ([t + 1 for t in h[0]], last, nxt)

    def _span_graph(self, need: tuple):
        """The graph of len(need) scheduled bytes with this latent pattern: captured at its first use (capture
        records, runs nothing), None past MAX_SPAN_GRAPHS patterns (those bytes replay one graph each)."""
        g = self.span_graphs.get(need)
        if g is None and len(self.span_graphs) < MAX_SPAN_GRAPHS:
            stream = torch.cuda.current_stream()
            try:  # (torch.cuda.graph synchronizes first: one wait per new pattern, at most MAX_SPAN_GRAPHS)
                g = self._record(lambda: [self._scheduled_byte(w) for w in need], self._pool)
            except Exception as e:
                raise self._capture_failed(e, stream) from e
            self.span_graphs[need] = g
        return g

    def _replay_completed(self, target: int, g_bytes, g_lat, timed) -> None:
        """"completed": part 1 (flag to host memory), part 2, [latent], part 3; with the entropy branch parts 1
        and 2 are one graph. The host waits for the first graph only; the next is already queued, so the GPU
        runs it while the host decides (without the branch)."""
        read_flag = self.latent_policy != "always"
        ready = torch.cuda.Event() if read_flag else None
        last = len(g_bytes) - 1  # the latent stage runs before the last part (the decoder)
        while self.n_done < target:
            for i, g in enumerate(g_bytes):
                if i == last:
                    need = True
                    if read_flag:
                        ready.synchronize()
                        need = bool(self.pred_host[0])
                    if need:
                        self._replay(g_lat, "latent", timed)
                self._replay(g, "byte" if i == 0 else "byte_rest", timed)
                if i == 0 and read_flag:
                    ready.record()
            self.n_done += 1

    def _replay_previous(self, target: int, g_bytes, g_lat, timed) -> None:
        early = self.split and self.latent_policy == "early"  # (a runner built without the split: as skip)
        ready = torch.cuda.Event() if early else None
        need = self._latent_needed()
        while self.n_done < target:
            if need:
                self._replay(g_lat, "latent", timed)
            self._replay(g_bytes[0], "byte", timed)
            if early:
                ready.record()  # after the first part: the flag is in host memory once this is reached
            for g in g_bytes[1:]:
                self._replay(g, "byte_rest", timed)
            self.n_done += 1
            if early:  # wait for the first part only; the rest of the byte runs meanwhile
                ready.synchronize()
                need = bool(self.pred_host[0])
            elif self.n_done < target:
                need = self._latent_needed()

    def _replay_lagged(self, target: int, g_bytes, timed) -> None:
        """"lagged" under 'skip': at a patch boundary the commit graph runs on the bytes' stream and the compute
        graph on latent_stream, which the next bytes do not wait for (their patch sees the output one patch later).
        The next boundary's commit waits for it (it shows that output, and rewrites the copies it reads). Joined
        before returning, so whatever follows sees a finished latent step. With lagged_host, whether a byte opens a
        patch comes from the patcher state read once here, then advanced on the host (fixed patching's rule), not
        from a flag read back after every byte."""
        outer, side = torch.cuda.current_stream(), self.latent_stream
        main = self.byte_stream or outer
        if main is not outer:
            main.wait_stream(outer)
        try:
            with torch.cuda.stream(main):
                self._lagged_bytes(target, g_bytes, timed, main, side)
        finally:  # (an interrupt too: what follows on `outer` comes after the queued bytes)
            main.wait_stream(side)
            if main is not outer:
                outer.wait_stream(main)

    def _lagged_bytes(self, target: int, g_bytes, timed, main, side) -> None:
        g_commit, g_compute = self.lag_graphs
        h = None
        if self.lagged_host:  # kept from the last replay, else read once (before any byte is queued)
            h = self._lag_h[1] if self._lag_h is not None and self._lag_h[0] == self.n_done else \
                self._read_patcher_state()
        need = any(h[2]) if h is not None else self._latent_needed()
        while self.n_done < target:
            if need:
                main.wait_stream(side)
                self._replay(g_commit, "latent_commit", timed)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    self._replay(g_compute, "latent", timed)
            self._replay(g_bytes[0], "byte", timed)
            self.n_done += 1
            if h is not None:  # (after the last byte too: h is kept for the next call)
                last, nxt = self._host_after(h)
                h = ([t + 1 for t in h[0]], last, nxt)
                need = any(nxt)
            elif self.n_done < target:
                need = self._latent_needed()
        self._lag_h = (self.n_done, h) if h is not None else None

    @staticmethod
    def _replay(graph, kind: str, timed: list | None) -> None:
        if timed is None:
            graph.replay()
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        timed.append((kind, a, b))
