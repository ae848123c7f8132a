"""The Triton kernels on strided (non-contiguous, last dim contiguous) inputs, as the model hands them over.

The kernels take q / k / v / dO (attention), u / dy (scan) and x (SSM scan) with their own strides instead of copying
them. The selfcheck rows feed contiguous tensors only, so a kernel reading one tensor with another's strides passed
them all; here the layouts are the model's: q / k / v a permute of the fused qkv projection and dO the transpose of
the output's gradient (Attention.forward), u / x a column slice of a wider tensor. Interpreter (CPU), fp32, vs the
references in fp64; fresh random inputs."""
import importlib.util

import pytest
from kernel_subprocess import run_json_script

_SCRIPT = """
import json, math, torch
from ionllama.kernels import dilated_attention_triton as dat, scan_triton as st, forced_routing, ssd_scan
from ionllama.kernels.selfcheck import rel_err
from ionllama.model.dilated_attention import dilated_attention_reference, dilated_offsets
from ionllama.model.scan import scan_const_decay
from ionllama.model.ssm import ssd_chunked

gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
errs = {}
# attention: q, k, v as Attention.project_qkv makes them (a permute of one (B, N, 3, H, Dh) tensor), dO as the
# gradient of y.transpose(1, 2).reshape(B, N, D) arrives (strides of (B, N, H, Dh))
B, H, N, Dh = 2, 2, 37, 16
qkv = torch.randn(B, N, 3, H, Dh, generator=gen).permute(2, 0, 3, 1, 4)
# q and k computed from their views (as apply_rope does: the permuted layout), v the view itself
q, k, v = (qkv[0] * 1.0).requires_grad_(), (qkv[1] * 0.7).requires_grad_(), qkv[2].requires_grad_()
do = torch.randn(B, N, H, Dh, generator=gen).transpose(1, 2)
assert not (q.is_contiguous() or v.is_contiguous() or do.is_contiguous()) and v.stride(2) != q.stride(2)
offs = dilated_offsets(N, 3)
o = dat.dilated_attention_triton(q, k, v, offs)
g = torch.autograd.grad(o, (q, k, v), do)
r_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
ref = dilated_attention_reference(*r_in, offs)
rg = torch.autograd.grad(ref, r_in, do.double())
errs["attn_out"] = rel_err(o, ref)
errs.update({f"attn_d{n}": rel_err(a, b) for n, a, b in zip("qkv", g, rg)})
# scan: u a column slice of a wider tensor (row stride 2D), dy transposed from (T, B, D)
B, T, D = 2, 45, 24
u = torch.randn(B, T, 2 * D, generator=gen)[..., :D].requires_grad_()
la = (-torch.exp(torch.empty(D).uniform_(math.log(2e-3), math.log(3.0), generator=gen))).requires_grad_()
h0 = torch.randn(B, D, generator=gen).requires_grad_()
dy = torch.randn(T, B, D, generator=gen).transpose(0, 1)
h = st.scan_const_decay_triton(u, la, h0)
g = torch.autograd.grad(h, (u, la, h0), dy)
r_in = [t.detach().double().requires_grad_() for t in (u, la, h0)]
ref = scan_const_decay(*r_in)
rg = torch.autograd.grad(ref, r_in, dy.double())
errs["scan_out"] = rel_err(h, ref)
errs.update({f"scan_d{n}": rel_err(a, b) for n, a, b in zip(["u", "log_a", "h0"], g, rg)})
# the Mamba-2 scan (forward only): x a slice of a wider (b, T, H, 2P) tensor, both the sequential and the split form
from ionllama.kernels import ssd_triton as sdt
b, T, Hs, P, Ns = 2, 45, 2, 16, 16
dt = torch.exp(torch.empty(b, T, Hs).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
log_a = -dt * torch.empty(Hs).uniform_(1, 16, generator=gen)
x = (torch.randn(b, T, Hs, 2 * P, generator=gen) * dt[..., None])[..., :P]
Bm, Cm = torch.randn(b, T, Ns, generator=gen), torch.randn(b, T, Ns, generator=gen)
h0 = torch.randn(b, Hs, P, Ns, generator=gen)
ry, rs = ssd_chunked(x.double(), log_a.double(), Bm.double(), Cm.double(), 16, h0.double())
for split in (0, 1):
    old = sdt.set_ssd_config(split=split)
    try:
        with torch.no_grad(), forced_routing(True):
            y, s = ssd_scan(x, log_a, Bm, Cm, 16, h0)
    finally:
        sdt.set_ssd_config(**old)
    errs[f"ssd{split}_y"], errs[f"ssd{split}_state"] = rel_err(y, ry), rel_err(s, rs)
print(json.dumps(errs))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter)")
def test_kernels_match_reference_on_strided_inputs_interpreter():
    errs = run_json_script(_SCRIPT, timeout=120)
    assert len(errs) == 12, errs
    for name, e in errs.items():
        assert e <= 1e-5, f"{name}: rel err {e:.3e} (strided inputs)"
