"""Byte-exact evaluation (ionllama/eval/bpb.py) and the learning-rate schedule."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ionllama import create_model
from ionllama.eval.bpb import evaluate_batches, evaluate_bpb
from ionllama.train.schedule import PhasePlan, warmup_cosine


class Recorder(nn.Module):
    """Uniform predictions; remembers every (x, y) it was asked to score."""

    def __init__(self, patch: int = 1):
        super().__init__()
        self.seen = []
        self.patch = patch

    def forward(self, x, targets=None):
        self.seen.append((x.clone(), targets.clone()))
        logits = torch.zeros(*x.shape, 256)
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), ignore_index=-100)
        n = torch.full((x.shape[0],), math.ceil(x.shape[1] / self.patch), dtype=torch.long)
        return {"logits": logits, "loss": loss, "bpb": loss / math.log(2), "n_patches": n}


@pytest.mark.parametrize("n,max_bytes", [(1000, None), (1025, None), (64 * 5 + 1, None), (1000, 333)])
def test_every_byte_is_scored_exactly_once(n, max_bytes):
    data = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8)
    m = Recorder()
    res = evaluate_bpb(m, data, seq_len=64, batch_size=3, device="cpu", max_bytes=max_bytes)
    scored = n - 1 if max_bytes is None else max_bytes
    targets = torch.cat([y.reshape(-1) for _, y in m.seen])
    assert targets.tolist() == data[1:scored + 1].tolist()  # in order, no gaps, no repeats
    for x, y in m.seen:  # each window conditions only on its own earlier bytes
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert res["bytes"] == scored
    assert res["bpb"] == pytest.approx(8.0) and res["ppl"] == pytest.approx(256.0)
    assert res["bytes_per_patch"] == pytest.approx(1.0)


def test_matches_a_direct_computation():
    torch.manual_seed(0)
    model = create_model("tiny", model="dense", d_model=32, n_layers=1, n_heads=2).eval()
    data = np.random.default_rng(1).integers(0, 256, 300).astype(np.uint8)
    res = evaluate_bpb(model, data, seq_len=64, batch_size=2, device="cpu")
    nats, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, 299, 64):
            w = torch.from_numpy(data[s:min(s + 65, 300)].astype(np.int64))[None]
            logits = model(w[:, :-1])["logits"]
            nats += F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    assert count == res["bytes"] == 299
    assert res["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert res["bpb"] == pytest.approx(nats / count / math.log(2), rel=1e-5)
    assert model.training is False
    # the same bytes as bytes, a list or a tensor score the same (a list was a numpy TypeError); bad sizes are one line
    for same in (data.tobytes(), data.tolist(), torch.from_numpy(data.astype(np.int64))):
        assert evaluate_bpb(model, same, 64, 2, "cpu")["bpb"] == res["bpb"]
    from ionllama.errors import UserError
    for bad, words in (((data, 0, 2), "seq_len must be a whole number >= 1"), ((data, 64, 0), "batch_size must be"),
                       ((data.astype(np.int64) + 200, 64, 2), "outside 0..255"), (("text", 64, 2), "got str"),
                       ((data.reshape(3, 100), 64, 2), "one flat sequence")):
        with pytest.raises(UserError, match=words):
            evaluate_bpb(model, *bad, device="cpu")
    for cap in (0, -5, 2.5):  # scored one byte without a word
        with pytest.raises(UserError, match="max_bytes must be a whole number >= 1"):
            evaluate_bpb(model, data, 64, 2, "cpu", max_bytes=cap)


def test_bytes_per_patch_and_ignored_targets():
    data = np.zeros(257, dtype=np.uint8)
    assert evaluate_bpb(Recorder(patch=4), data, 64, 4, "cpu")["bytes_per_patch"] == pytest.approx(4.0)
    x = torch.zeros(2, 8, dtype=torch.long)
    y = torch.full((2, 8), -100)
    y[0, 3] = 5
    res = evaluate_batches(Recorder(), [(x, y)], "cpu")
    assert res["bytes"] == 1 and res["bpb"] == pytest.approx(8.0)


def test_schedule_warmup_cosine_and_phases():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(99, 100, 10) == pytest.approx(0.1)  # the last step is at 10 %
    vals = [warmup_cosine(t, 100, 10) for t in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    plan = PhasePlan(entropy_steps=30, max_steps=100, joint_steps=10, lr=1e-3, entropy_lr=2e-3, warmup_steps=10)
    assert [plan.phase_of(s) for s in (0, 29, 30, 119, 120, 129)] == ["entropy"] * 2 + ["main"] * 2 + ["joint"] * 2
    assert plan.total == 130
    assert plan.lr_at(2) <= 2e-3 and plan.lr_at(30) == pytest.approx(1e-4)  # main warmup starts again
    assert plan.lr_at(125) == pytest.approx(1e-4)  # joint: lr x 0.1
