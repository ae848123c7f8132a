"""The decode loop: sample -> (latent step if a patch closes) -> byte step, eagerly or replayed as
CUDA graphs.

One iteration, for every decoder:  tok = sample(logits, step); out[:, step] = tok;
logits = step(tok); step += 1. Decoders with a separate latent stage (ionLlama) run
``advance_latent()`` first when some row's next byte opens a patch. All state lives in fixed
tensors, so on CUDA the iteration is captured once as a graph (plus one for the latent stage) and
replayed: the per-byte cost becomes the GPU time of the kernels, not Python and launch overhead.
Optionally the stages are compiled with torch.compile before capture (fewer, fused kernels).
Graph replay runs exactly the kernels of the eager iteration, so results do not depend on it.
"""
from __future__ import annotations

import torch

from .sampling import SamplingConfig, sample_next


class DecodeRunner:
    def __init__(self, dec, cfg: SamplingConfig, seeds: torch.Tensor, logits: torch.Tensor, max_new: int,
                 cuda_graphs: bool = False, compile: bool = False, latent_policy: str = "auto"):
        """logits: the prefill's (B, V) next-byte logits. latent_policy: 'skip' (read the patch flags on
        the host each byte and run the latent stage only when a row opens a patch), 'always' (run it
        every byte with a masked commit: no host sync, better for large batches), 'auto' (skip for
        batch <= 2)."""
        self.dec, self.cfg = dec, cfg
        B, dev = logits.shape[0], logits.device
        self.seeds = seeds
        self.logits = logits.clone()
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.step_no = torch.zeros((), dtype=torch.long, device=dev)
        self.out = torch.zeros(B, max_new + 1, dtype=torch.long, device=dev)
        self.max_new = max_new
        self.n_done = 0
        self.has_latent = hasattr(dec, "advance_latent")
        if latent_policy == "auto":
            latent_policy = "skip" if B <= 2 else "always"
        self.latent_policy = latent_policy
        self.no_rows = torch.zeros(B, dtype=torch.bool, device=dev)
        self._byte_fn, self._latent_fn = self._iteration, (dec.advance_latent if self.has_latent else None)
        if compile:
            self._byte_fn = torch.compile(self._iteration, dynamic=False)
            if self.has_latent:
                self._latent_fn = torch.compile(dec.advance_latent, dynamic=False)
        self.graphs = None
        self.want_graphs = cuda_graphs and logits.is_cuda

    def reset(self, logits: torch.Tensor) -> None:
        """Start over after the decoder was prefilled again (in place): captured graphs stay valid."""
        self.logits.copy_(logits)
        self.step_no.zero_()
        self.out.zero_()
        self.n_done = 0

    # ---------------------------------------------------------------- one iteration (graph body)
    def _iteration(self) -> None:
        tok = sample_next(self.logits, self.cfg, self.seeds, self.step_no)
        self.tok.copy_(tok)
        self.out.scatter_(1, self.step_no.view(1, 1).expand(tok.shape[0], 1), tok[:, None])
        step = self.dec.byte_step if self.has_latent else self.dec.step
        self.logits.copy_(step(self.tok))
        self.step_no += 1

    def _latent_needed(self) -> bool:
        if not self.has_latent:
            return False
        return self.latent_policy == "always" or bool(self.dec.next_start.any())

    def _eager_once(self) -> None:
        if self._latent_needed():
            self._latent_fn(self.dec.next_start)  # always called with the mask: one compiled signature
        self._byte_fn()
        self.n_done += 1

    def _capture(self) -> None:
        """Warm up with real iterations (lazy inits, compilation) on a side stream, then record."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(min(3, self.max_new - self.n_done)):
                self._eager_once()
            if self.has_latent:  # warm the latent stage with no row committing: state unchanged
                for _ in range(2):
                    self._latent_fn(self.no_rows)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        g_byte = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_byte, pool=pool):
            self._byte_fn()
        g_lat = None
        if self.has_latent:
            g_lat = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_lat, pool=pool):
                self._latent_fn(self.dec.next_start)
        self.graphs = (g_byte, g_lat)

    @torch.no_grad()
    def run(self, n: int) -> None:
        """Advance n iterations (n bytes sampled into self.out)."""
        target = min(self.max_new, self.n_done + n)
        if self.want_graphs and self.graphs is None and target - self.n_done > 4:
            self._capture()
        while self.n_done < target:
            if self.graphs is None:
                self._eager_once()
                continue
            g_byte, g_lat = self.graphs
            if self._latent_needed():
                g_lat.replay()
            g_byte.replay()
            self.n_done += 1
