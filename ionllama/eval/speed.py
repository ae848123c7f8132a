"""Speed and memory: forward throughput on a training-style batch, latency for a fixed input,
generation bytes/s, and peak memory (CUDA allocator peak, or the process's peak RSS on CPU)."""
from __future__ import annotations

import resource
import statistics
import sys
import time

import numpy as np
import torch

from .lm import autocast_ctx, encode_tokens, is_token_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _batch(data: np.ndarray, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Real bytes or tokens (the eval data, repeated if short) so data-dependent models (patching) behave as in use."""
    need = batch_size * seq_len
    buf = np.resize(np.asarray(data), need)
    return torch.from_numpy(buf.astype(np.int64)).view(batch_size, seq_len).to(device)


def _gen_prompt(data: np.ndarray, n: int) -> bytes:
    """n bytes from inside the longest document of the first 64 KiB: a prompt ending mid-text, where a
    trained model does not end the document (generation stops on DOC_SEP)."""
    raw = bytes(np.asarray(data[:65536], dtype=np.uint8))
    doc = max(raw.split(b"\x00"), key=len)
    start = max(0, min(len(doc) // 3, len(doc) - n))
    return doc[start:start + n] or b"\x00"


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def run_speed(model, data: np.ndarray, device, seq_len: int, batch_size: int, amp_dtype=None, iters: int = 5,
              warmup: int = 2, gen_bytes: int = 256, gen_prompt_bytes: int = 64, train_step: bool = True) -> dict:
    device = torch.device(device)
    model.eval()
    res: dict = {"seq_len": seq_len, "batch_size": batch_size, "iters": iters, "warmup": warmup,
                 "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none"}
    mem: dict = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    if is_token_model(model):  # seq_len counts tokens; throughput still counts the bytes they cover
        x = _batch(encode_tokens(model, data[: 8 * batch_size * seq_len]), batch_size, seq_len, device)
        nbytes = model.token_nbytes[x]
        n_in, n_in1 = int(nbytes.sum()), int(nbytes[0].sum())
        res["unit"] = "tokens"
    else:
        x = _batch(data, batch_size, seq_len, device)
        n_in, n_in1 = x.numel(), x.shape[1]

    def fwd():
        with torch.no_grad(), autocast_ctx(device, amp_dtype):
            model(x)

    t = _timed(fwd, device, warmup, iters)
    res["forward_bytes_per_s"] = n_in / statistics.median(t)
    res["forward_ms_median"] = 1000 * statistics.median(t)
    if device.type == "cuda":
        mem["forward_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    if train_step:
        # forward + backward, as in training (no optimizer step): the throughput the trainer can reach
        y = torch.roll(x, -1, dims=1)
        model.train()
        # the main phase's step, which most of training is: the entropy model frozen (it trained in its own phase
        # before). Unfrozen, its backward and aux loss counted too, lowering the bytes/s and raising the peak memory
        was_frozen = getattr(model, "_entropy_frozen", None)
        freeze = was_frozen is not None and getattr(model, "needs_entropy_phase", False)
        if freeze:
            model.freeze_entropy(True)
            res["train_step_phase"] = "main (entropy model frozen)"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def fwd_bwd():
            with autocast_ctx(device, amp_dtype):
                loss = model(x, y)["loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)

        try:
            t = _timed(fwd_bwd, device, 1, max(2, iters // 2))
        finally:
            if freeze:
                model.freeze_entropy(was_frozen)
        model.eval()
        res["train_step_bytes_per_s"] = n_in / statistics.median(t)
        if device.type == "cuda":
            mem["train_step_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    # latency: one sequence of seq_len bytes, batch 1
    x1 = x[:1]

    def one():
        with torch.no_grad(), autocast_ctx(device, amp_dtype):
            model(x1)

    t = _timed(one, device, warmup, iters)
    res["latency_ms"] = {"input_bytes": n_in1, "input_positions": int(x1.numel()), "median": 1000 * statistics.median(t),
                         "min": 1000 * min(t), "max": 1000 * max(t)}

    # generation: greedy, batch 1, no stop, from a real prompt
    prompt = _gen_prompt(data, gen_prompt_bytes)
    try:
        if not hasattr(model, "generate"):
            raise AttributeError("the model has no generate()")
        def gen():
            with autocast_ctx(device, amp_dtype):
                return model.generate(prompt, max_new_bytes=gen_bytes, greedy=True)

        gen()  # warm-up (allocations, compilation of cached steps)
        _sync(device)
        t0 = time.perf_counter()
        out = gen()
        _sync(device)
        dt = time.perf_counter() - t0
        n_new = len(out)
        res["generation"] = {"batch_size": 1, "prompt_bytes": len(prompt), "max_new_bytes": gen_bytes,
                             "new_bytes": n_new, "seconds": dt,
                             "bytes_per_s": n_new / dt if dt > 0 and n_new else None,
                             "stopped_early": n_new < gen_bytes,
                             "note": "greedy from mid-document text; generation ends early only if the model emits DOC_SEP"}
    except (ImportError, NotImplementedError, AttributeError) as e:
        res["generation"] = {"skipped": f"model.generate unavailable ({type(e).__name__}: {e})"}

    if device.type == "cuda":
        mem["device"] = torch.cuda.get_device_name(device)
        mem["kind"] = "cuda max_memory_allocated"
    else:
        mem["peak_rss_mb"] = peak_rss_mb()
        mem["kind"] = "process peak RSS (includes Python, torch and the loaded data)"
    return {"speed": res, "memory": mem}
