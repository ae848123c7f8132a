"""The training step captured as one CUDA graph (ionllama/train/step_graph.py): on a CPU its step code runs
eagerly and must train exactly like the trainer's ordinary step; on a GPU the replayed graph must give the
eager step's numbers. Which configurations may be captured is checked everywhere."""
import copy
from types import SimpleNamespace

import pytest
import torch

import ionllama
from ionllama.train.optim import make_adamw
from ionllama.train.step_graph import StepGraph, step_graph_problem


def _models():
    torch.manual_seed(0)
    return {
        "dense": ionllama.create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2),
        "ionllama_fixed": ionllama.create_model(
            "tiny", patching="fixed", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1,
            n_dec_layers=1, d_entropy=16, n_entropy_layers=1, entropy_headdim=8, ngram_buckets=64),
    }


def _batches(n, B=2, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randint(0, 256, (n, B, T + 1), generator=g)
    return [(x[:, :-1], x[:, 1:]) for x in xs]


def _ordinary_steps(model, batches, lrs, clip):
    """The trainer's plain step: zero grads (None), forward, backward, clip, AdamW with a float lr."""
    opt = make_adamw(model, model.parameters(), lrs[0], 0.1, torch.device("cpu"))
    losses = []
    for (x, y), lr in zip(batches, lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(x, y)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))
    return losses


@pytest.mark.parametrize("name", ["dense", "ionllama_fixed"])
def test_step_graph_code_trains_like_the_ordinary_step(name):
    a = _models()[name]
    b = copy.deepcopy(a)
    batches, lrs = _batches(5), [1e-3, 2e-3, 3e-3, 2e-3, 1e-3]
    ref = _ordinary_steps(a, batches, lrs, clip=0.5)
    opt = make_adamw(b, b.parameters(), 5e-4, 0.1, torch.device("cpu"), capturable=True)
    sg = StepGraph(b, opt, 0.5, autocast=lambda: torch.autocast("cpu", enabled=False), graphs=False)
    got = [float(sg(x, y, lr)["loss"]) for (x, y), lr in zip(batches, lrs)]
    assert got == pytest.approx(ref, rel=1e-5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert opt.param_groups[0]["lr"] is opt.param_groups[-1]["lr"] and float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3)


def test_which_steps_can_be_captured():
    m = _models()
    cuda = torch.device("cuda")
    ok = SimpleNamespace(grad_accum=1, seq_len=64, compile_mode="default")
    assert step_graph_problem(m["dense"], ok, cuda, 1, torch.bfloat16) is None
    assert step_graph_problem(m["ionllama_fixed"], ok, cuda, 1, None) is None
    entropy = ionllama.create_model("tiny", d_model=32, n_layers=1, n_heads=2, d_local=32, n_enc_layers=1,
                                    n_dec_layers=1, d_entropy=16, n_entropy_layers=1, entropy_headdim=8)
    cases = [(m["dense"], ok, torch.device("cpu"), 1, None, "CUDA device"),
             (m["dense"], ok, cuda, 2, None, "one process"),
             (m["dense"], SimpleNamespace(grad_accum=2, seq_len=64, compile_mode="default"), cuda, 1, None,
              "--grad_accum 1"),
             (m["dense"], ok, cuda, 1, torch.float16, "fp16"),
             (entropy, ok, cuda, 1, None, "--patching entropy reads it on the host"),
             (m["dense"], SimpleNamespace(grad_accum=1, seq_len=64, compile_mode="reduce-overhead"), cuda, 1, None,
              "pick one")]
    for model, args, dev, world, amp, words in cases:
        assert words in step_graph_problem(model, args, dev, world, amp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["dense", "ionllama_fixed"])
def test_replayed_step_graph_equals_eager_steps(name):
    """Warm-up steps, capture, then replays: the same losses and weights as running the step code eagerly."""
    a = _models()[name].cuda()
    b = copy.deepcopy(a)
    batches, lrs = _batches(8), [1e-3 * (1 + i % 3) for i in range(8)]
    runs = []
    for model, graphs in ((a, False), (b, True)):
        opt = make_adamw(model, model.parameters(), 1e-3, 0.1, torch.device("cuda"), capturable=True)
        sg = StepGraph(model, opt, 0.5, autocast=lambda: torch.autocast("cuda", enabled=False), graphs=graphs)
        runs.append([float(sg(x, y, lr)["loss"]) for (x, y), lr in zip(batches, lrs)])
        assert (sg.graph is not None) == graphs
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_trainer_with_step_graph_learns_and_resumes(tmp_path):
    """ionllama train --step_graph end to end on the GPU: the loss falls, and a resumed run (optimizer state
    with the learning-rate tensor restored from the checkpoint) goes on with the graph."""
    from test_train import TINY, write_corpus

    from ionllama.train.cli import main
    from ionllama.train.metrics import read_metrics

    corpus = write_corpus(tmp_path / "docs.jsonl")
    base = TINY + ["--data_path", str(corpus), "--data_dir", str(tmp_path / "cache"), "--save_dir",
                   str(tmp_path / "runs"), "--run_name", "g", "--seq_len", "32", "--batch_size", "4",
                   "--log_interval", "1", "--eval_interval", "10", "--sample_bytes", "0", "--device", "cuda",
                   "--val_fraction", "0.1", "--lr", "3e-3", "--warmup_steps", "2", "--step_graph", "--compile"]
    assert main(base + ["--max_steps", "30", "--stop_at", "12"]) == 0
    assert main(base + ["--max_steps", "30", "--resume", "auto"]) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "runs" / "g" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
