"""The opt-in training scan through fla-core (ionllama/kernels/ssd_fla.py). fla-core imports only on a GPU machine, so
here its entry point is replaced by a plain-loop model of its documented contract (simple GLA, head-wise decay,
state_v_first); that checks our argument mapping (q = C, k = B, v = x, g = log_a, scale 1, the state's layout) and
the gradients through it against ssd_chunked. The library itself is checked against ssd_chunked on the GPU:
`python -m ionllama.kernels.selfcheck --device cuda --large --kinds ssd_fla`."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from ionllama.kernels import ssd_fla
from ionllama.model.ssm import ssd_chunked
from ionllama.train.cli import main as train_main
from test_train import corpus  # noqa: F401  (the module's corpus fixture)


def simple_gla_loop(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                    state_v_first=False, **_):
    """fla's chunk_simple_gla as its docstring states it: h_t = exp(g_t) h_{t-1} + k_t^T v_t (K x V per head),
    o_t = scale * q_t h_t; with state_v_first the state comes and goes as (V, K)."""
    B, T, H, K = q.shape
    h = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        h = (initial_state.transpose(-1, -2) if state_v_first else initial_state).double()
    outs = []
    for t in range(T):
        kv = k[:, t].double()[..., :, None] * v[:, t].double()[..., None, :]
        h = torch.exp(g[:, t].double())[..., None, None] * h + kv
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].double(), h))
    final = h.transpose(-1, -2) if state_v_first else h
    return torch.stack(outs, 1).to(v.dtype), (final if output_final_state else None)


@pytest.fixture
def fake_fla(monkeypatch):
    mod = types.ModuleType("fla.ops.simple_gla")
    mod.chunk_simple_gla = simple_gla_loop
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", mod)
    monkeypatch.setattr(ssd_fla, "_FLA_OK", None)
    yield
    ssd_fla._FLA_OK = None


def _inputs(B, T, H, P, N, with_h0, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.empty(B, T, H).uniform_(-6.9, -2.3, generator=gen))
    log_a = -dt * torch.empty(H).uniform_(1, 16, generator=gen)
    x = torch.randn(B, T, H, P, generator=gen) * dt[..., None]
    Bm, Cm = torch.randn(B, T, N, generator=gen), torch.randn(B, T, N, generator=gen)
    h0 = torch.randn(B, H, P, N, generator=gen) if with_h0 else None
    return [t.double().requires_grad_() if t is not None else None for t in (x, log_a, Bm, Cm, h0)]


@pytest.mark.parametrize("with_h0", [False, True])
def test_mapping_onto_simple_gla_gives_ssd_chunked_values_and_gradients(fake_fla, with_h0):
    ins = _inputs(2, 37, 3, 5, 4, with_h0, seed=int(torch.randint(0, 2 ** 31, ()).item()))
    present = [t for t in ins if t is not None]
    y, state = ssd_fla.ssd_scan_fla(*ins)
    ref_y, ref_state = ssd_chunked(*ins[:4], 16, ins[4])
    assert state.shape == ref_state.shape == (2, 3, 5, 4) and state.dtype == torch.float32
    torch.testing.assert_close(y, ref_y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-6, atol=1e-6)  # (returned as fp32)
    dy, ds = torch.randn_like(y), torch.randn_like(ref_state)
    got = torch.autograd.grad([y, state], present, [dy, ds.float()])
    want = torch.autograd.grad([ref_y, ref_state], present, [dy, ds])
    for name, a, b in zip(["x", "log_a", "B", "C", "h0"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"d{name}")


def test_dispatcher_takes_fla_only_when_asked_on_cuda_with_a_gradient(fake_fla, monkeypatch):
    import ionllama.kernels as K

    calls = []
    monkeypatch.setattr(ssd_fla, "ssd_scan_fla", lambda *a: calls.append(a) or ("fla", None))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # route as if on a GPU
    ins = _inputs(1, 8, 2, 4, 4, False, seed=0)
    monkeypatch.setattr(ssd_fla, "SSD_TRAIN_BACKEND", "reference")
    assert K.ssd_scan(*ins[:4], 16)[0] != "fla" and not calls  # not asked: the reference
    monkeypatch.setattr(ssd_fla, "SSD_TRAIN_BACKEND", "fla")
    with torch.no_grad():  # no gradient: not fla's job (the forward-only kernel or the reference)
        monkeypatch.setattr(K, "ssd_uses_triton", lambda *a: False)
        assert K.ssd_scan(*ins[:4], 16)[0] != "fla" and not calls
    assert K.ssd_scan(*ins[:4], 16)[0] == "fla" and len(calls) == 1


def test_asked_for_without_fla_or_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(ssd_fla, "SSD_TRAIN_BACKEND", "fla")
    assert "needs a CUDA device" in ssd_fla.fla_problem(torch.device("cpu"))
    monkeypatch.setattr(ssd_fla, "_FLA_OK", False)
    assert "pip install fla-core" in ssd_fla.fla_problem(torch.device("cuda"))
    monkeypatch.setattr(ssd_fla, "SSD_TRAIN_BACKEND", "reference")
    assert ssd_fla.fla_problem(torch.device("cpu")) is None


def test_trainer_refuses_the_setting_on_cpu_before_training(tmp_path, corpus, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(ssd_fla, "SSD_TRAIN_BACKEND", "fla")
    with pytest.raises(SystemExit) as e:
        train_main(["--model", "mamba", "--d_model", "32", "--n_layers", "1", "--data_path", str(corpus),
                    "--data_dir", str(tmp_path / "cache"), "--save_dir", str(tmp_path / "runs"), "--run_name", "r",
                    "--seq_len", "32", "--batch_size", "4", "--max_steps", "2", "--device", "cpu",
                    "--sample_bytes", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "IONLLAMA_SSD_TRAIN=fla needs a CUDA device" in err[0], err
    assert not (tmp_path / "runs" / "r" / "latest.pt").exists()


def test_selfcheck_runs_ssd_fla_only_when_named_and_skips_it_in_words_where_fla_cannot_run(monkeypatch, capsys):
    from ionllama.kernels import selfcheck

    assert "ssd_fla" not in selfcheck.KINDS  # an optional package: not part of the default run
    assert [c for c in selfcheck.cases(True) if c[0] == "ssd_fla"] and not [c for c in selfcheck.cases(False)
                                                                           if c[0] == "ssd_fla"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ssd_fla, "_FLA_OK", False)
    assert selfcheck.main(["--device", "cpu", "--large", "--kinds", "ssd_fla", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    n = len([c for c in selfcheck.cases(True) if c[0] == "ssd_fla"])
    assert out.strip() == "[]" and err.count("SKIP ssd_fla") == n and "pip install fla-core" in err, (out, err)
