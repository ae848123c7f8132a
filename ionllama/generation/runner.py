"""The decode loop: sample -> (latent step if a patch closes) -> byte step, eagerly or replayed as
CUDA graphs.

One iteration, for every decoder:  tok = sample(logits, step); out[:, step] = tok;
logits = step(tok); step += 1. Decoders with a separate latent stage (ionLlama) run
``advance_latent()`` first when some row's next byte opens a patch. All state lives in fixed
tensors, so on CUDA the iterations are captured as graphs and replayed: the per-byte cost becomes the
GPU time of the kernels, not Python and launch overhead. Optionally the stages are compiled with
torch.compile before capture (fewer, fused kernels). Graph replay runs exactly the kernels of the
eager iteration, so results do not depend on it.

Two graph layouts:
* ``graph_steps=1`` (default): one graph for "sample + byte step", one for the latent stage. At
  batch <= 2 the host reads the patch flag after every byte to decide whether to replay the latent
  graph: one host sync, two graph launches and some Python per byte, with the GPU idle meanwhile.
* ``graph_steps=K > 1``: K whole iterations in ONE graph; each iteration's latent stage sits in a
  CUDA-graph conditional (if) node that the GPU evaluates from the patch flag, so it runs only when
  a row opens a patch, without the host. The host launches one graph per K bytes and reads the
  sampled bytes when the caller asks (``generate`` checks stop strings every chunk; bytes sampled
  past a stop are discarded there). A remainder of fewer than K bytes replays a 1-iteration graph of
  the same kind, so the decoder never runs past ``max_new``. Without conditional-node support
  (torch without the API, CUDA < 12.4), or if the capture fails, it falls back to ``graph_steps=1``
  with a warning.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .sampling import NoiseSource, SamplingConfig, sample_next


@functools.lru_cache(maxsize=None)
def conditional_nodes_supported(device_index: int = 0) -> bool:
    """Can this torch/driver capture an if-node into a CUDA graph? Probed once with a one-op graph."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return False
    try:
        dev = torch.device("cuda", device_index)
        pred = torch.ones((), dtype=torch.bool, device=dev)
        x = torch.zeros(1, device=dev)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=torch.cuda.Stream(dev, priority=-1)):
            g.begin_capture_to_if_node(pred)
            x.add_(1)
            g.end_capture_to_conditional_node()
        g.replay()
        pred.fill_(False)
        g.replay()
        torch.cuda.synchronize(dev)
        return float(x) == 1.0
    except Exception as e:  # noqa: BLE001 - any failure means: use the host-sync layout
        warnings.warn(f"CUDA graph conditional nodes unavailable ({type(e).__name__}: {e}); graph_steps=1")
        return False


class DecodeRunner:
    def __init__(self, dec, cfg: SamplingConfig, seeds: torch.Tensor, logits: torch.Tensor, max_new: int,
                 cuda_graphs: bool = False, compile: bool = False, latent_policy: str = "auto",
                 graph_steps: int = 1, compile_mode: str | None = None):
        """logits: the prefill's (B, V) next-byte logits. latent_policy (graph_steps=1 only): 'skip' (read
        the patch flags on the host each byte and run the latent stage only when a row opens a patch),
        'always' (run it every byte with a masked commit: no host sync, better for large batches),
        'auto' (skip for batch <= 2). graph_steps: iterations per graph replay (see the module doc)."""
        if graph_steps < 1:
            raise ValueError(f"graph_steps must be >= 1, got {graph_steps}")
        self.dec, self.cfg = dec, cfg
        B, dev = logits.shape[0], logits.device
        self.seeds = seeds
        self.noise = NoiseSource(seeds, logits.shape[-1])
        self.logits = logits.clone()
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.step_no = torch.zeros((), dtype=torch.long, device=dev)
        self.out = torch.zeros(B, max_new + 1, dtype=torch.long, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.max_new = max_new
        self.n_done = 0
        self.has_latent = hasattr(dec, "advance_latent")
        if latent_policy == "auto":
            latent_policy = "skip" if B <= 2 else "always"
        self.latent_policy = latent_policy
        self.no_rows = torch.zeros(B, dtype=torch.bool, device=dev)
        # does the next iteration need the latent stage? (0-d bool: an if-node's predicate)
        self.latent_pred = torch.zeros((), dtype=torch.bool, device=dev)
        self._set_pred()
        self._byte_fn, self._latent_fn = self._iteration, (dec.advance_latent if self.has_latent else None)
        if compile:
            self._byte_fn = torch.compile(self._iteration, dynamic=False, mode=compile_mode)
            if self.has_latent:
                self._latent_fn = torch.compile(dec.advance_latent, dynamic=False, mode=compile_mode)
        self.graphs = None
        self.want_graphs = cuda_graphs and logits.is_cuda
        self.graph_steps = graph_steps
        if (self.want_graphs and graph_steps > 1 and self.has_latent
                and not conditional_nodes_supported(logits.device.index or 0)):
            self.graph_steps = 1

    def _set_pred(self) -> None:
        if self.has_latent:
            self.latent_pred.copy_(self.dec.next_start.any())

    def reset(self, logits: torch.Tensor) -> None:
        """Start over after the decoder was prefilled again (in place): captured graphs stay valid."""
        self.logits.copy_(logits)
        self.step_no.zero_()
        self.out.zero_()
        self._set_pred()
        self.n_done = 0

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

    def _latent_needed(self) -> bool:
        if not self.has_latent:
            return False
        return self.latent_policy == "always" or bool(self.latent_pred)

    def _eager_once(self) -> None:
        if self._latent_needed():
            self._latent_fn(self.dec.next_start)  # always called with the mask: one compiled signature
        self._byte_fn()
        self.n_done += 1

    def _steps(self, k: int, graph: torch.cuda.CUDAGraph | None = None) -> None:
        """k iterations with the latent decision on the device: captured into `graph` as if-nodes, or
        (graph None) run eagerly with the host reading the same predicate. Both run the same kernels."""
        for _ in range(k):
            if self.has_latent:
                if graph is None:
                    if bool(self.latent_pred):
                        self._latent_fn(self.dec.next_start)
                else:
                    graph.begin_capture_to_if_node(self.latent_pred)
                    try:
                        self._latent_fn(self.dec.next_start)
                    finally:  # a failed body must still end its child capture (see _capture's fallback)
                        graph.end_capture_to_conditional_node()
            self._byte_fn()

    def _warm_up(self) -> None:
        """Real iterations (lazy inits, compilation, cuBLAS handles) on a side stream before capture."""
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

    def _capture(self) -> None:
        self._warm_up()
        if self.graph_steps > 1:
            try:
                self.graphs = self._capture_steps(torch.cuda.graph_pool_handle())
                return
            except Exception as e:  # noqa: BLE001 - capture only records work: nothing ran, state is intact
                warnings.warn(f"capturing {self.graph_steps} iterations per graph failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); falling back to graph_steps=1")
                self.graph_steps = 1
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

    def _capture_steps(self, pool) -> tuple:
        """(graph of graph_steps iterations, graph of 1 iteration), latent stages in if-nodes."""
        # A high-priority capture stream: each if-node body is captured on a stream taken from the
        # (low-priority) pool, which must never be the stream the parent graph is captured on.
        stream = torch.cuda.Stream(priority=-1)
        graphs = []
        for k in (self.graph_steps, 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                self._steps(k, g)
            graphs.append(g)
        return tuple(graphs)

    @torch.no_grad()
    def run(self, n: int) -> None:
        """Advance n iterations (n bytes sampled into self.out); never past max_new."""
        target = min(self.max_new, self.n_done + n)
        if self.want_graphs and self.graphs is None and target - self.n_done > 4:
            self._capture()
        K = self.graph_steps
        while self.n_done < target:
            left = target - self.n_done
            if self.graphs is None:
                if K > 1:
                    k = min(K, left)
                    self._steps(k)
                    self.n_done += k
                else:
                    self._eager_once()
            elif K > 1:
                g_many, g_one = self.graphs
                if left >= K:
                    g_many.replay()
                    self.n_done += K
                else:
                    g_one.replay()
                    self.n_done += 1
            else:
                g_byte, g_lat = self.graphs
                if self._latent_needed():
                    g_lat.replay()
                g_byte.replay()
                self.n_done += 1
