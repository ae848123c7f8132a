"""MambaByte training step (compile, bf16 autocast), ssd_chunked of commit 264bede ("old", saved as scratch_old_ssm.py by `git show 264bede:ionllama/model/ssm.py > scratch_old_ssm.py`) vs the merged matmul form ("new"). Run from the repo root with PYTHONPATH=.: python3 ssd_model_ab.py 64 old,new"""
import sys, time, torch
import ionllama.model.ssm as ssm
import scratch_old_ssm
from ionllama.config import ModelConfig
from ionllama.registry import build_model

new = ssm.ssd_chunked
d, layers, T, B = 384, 16, 1024, 64
chunks = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "64").split(",")]
variants = (sys.argv[2] if len(sys.argv) > 2 else "old,new").split(",")
hd = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # override headdim/d_state (0: the model's own)
torch.manual_seed(0)
x = torch.randint(0, 256, (B, T + 1), device="cuda")
for L in chunks:
    for name in variants:
        ssm.ssd_chunked = scratch_old_ssm.ssd_chunked if name == "old" else new
        torch._dynamo.reset()
        import ionllama.model.mamba_byte as mb
        if hd:
            mb.D_STATE, mb.HEADDIM = hd, hd
        torch.manual_seed(0)
        m = build_model(ModelConfig(model="mamba", d_model=d, n_layers=layers, scan_chunk=L)).cuda()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
        cm = torch.compile(m)
        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = cm(x[:, :-1], x[:, 1:])["loss"]
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return loss
        t0 = time.perf_counter(); l0 = step().item(); tc = time.perf_counter() - t0
        for _ in range(3): step()
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10): step()
        e.record(); torch.cuda.synchronize()
        blk = m.blocks[0].mixer
        print(f"model H={blk.n_heads} P={blk.headdim} N={blk.d_state} chunk={L} {name}: {s.elapsed_time(e)/10:.1f} ms/step, "
              f"peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB, first loss {l0:.4f}, compile {tc:.0f}s", flush=True)
        del m, opt, cm
        torch.cuda.empty_cache()
