"""Baselines of the experiment matrix: the BPE transformer (exact byte accounting) and MambaByte."""
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from ionllama import create_model
from ionllama.data import tasks as T
from ionllama.data.bpe import (ByteBPE, TokenWindowSampler, evaluate_token_bpb, make_token_task_batch,
                               open_token_shards, prepare_tokens, train_tokenizer)
from ionllama.data.shards import DataArgs, open_shards, prepare
from ionllama.errors import UserError

GUTENBERG_VAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gutenberg" / "gutenberg-val.jsonl.xz"


def _snippets(n_docs: int, doc_bytes: int) -> list[str]:
    """Small documents cut from the first book of the Gutenberg val split (a built-in fallback text when
    the shared data is not on this machine)."""
    text = None
    if GUTENBERG_VAL.is_file():
        with lzma.open(GUTENBERG_VAL, "rt", encoding="utf-8") as f:
            text = json.loads(f.readline())["text"]
    if not text:
        import ionllama.train.trainer as t

        text = Path(t.__file__).read_text() * 4
    start = len(text) // 3  # skip the licence header
    return [text[start + i * doc_bytes:start + (i + 1) * doc_bytes] for i in range(n_docs)]


def write_corpus(tmp_path: Path, n_train: int = 24, n_val: int = 4, doc_bytes: int = 1500) -> str:
    docs = _snippets(n_train + n_val, doc_bytes)
    docs[1] += " caf\u00e9 \u4e2d\u6587 \U0001f600"  # multi-byte characters must survive exactly
    for split, part in (("train", docs[:n_train]), ("val", docs[n_train:])):
        with open(tmp_path / f"corpus-{split}.jsonl", "w", encoding="utf-8") as f:
            for i, d in enumerate(part):
                f.write(json.dumps({"id": i, "text": d}) + "\n")
    return str(tmp_path / "corpus-{split}.jsonl")


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: one thread avoids OpenMP contention stalls
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    pattern = write_corpus(tmp)
    byte_dir = prepare(DataArgs(data_path=pattern, data_dir=str(tmp / "cache")), log=lambda m: None)
    tok_dir = prepare_tokens(byte_dir, vocab_size=320, log=lambda m: None)
    return {"pattern": pattern, "byte_dir": byte_dir, "tok_dir": tok_dir, "tmp": tmp}


def test_bpe_encoding_is_byte_exact():
    bpe = train_tokenizer([s.encode() for s in _snippets(8, 1000)], vocab_size=300)
    assert bpe.vocab_size == 300
    assert sorted(bpe.token_bytes[i] for i in bpe.byte_ids) == [bytes([b]) for b in range(256)]
    data = b"\x00Hello there, caf\xc3\xa9!\x00\x00 bad \xff\xfe utf8 \xc3\x00tail \xf0\x9f\x98\x80"
    ids = bpe.encode(data)
    assert bpe.decode(ids) == data
    assert bpe.n_bytes(ids) == len(data)
    assert (ids == bpe.sep_id).sum() == data.count(0)
    assert len(ids) < len(data)  # merges happened
    again = ByteBPE.from_str(bpe.to_str())
    assert np.array_equal(again.encode(data), ids)


def test_token_shards_cover_every_byte(corpus):
    shards = open_shards(corpus["byte_dir"])
    toks = open_token_shards(corpus["tok_dir"])
    for name in ("train", "val"):
        ids = np.asarray(getattr(toks, name), dtype=np.int64)
        assert toks.bpe.token_nbytes[ids].sum() == len(getattr(shards, name))
        assert toks.bpe.decode(ids[:400]) == bytes(getattr(shards, name)[:toks.bpe.n_bytes(ids[:400])])
        assert ids[0] == toks.bpe.sep_id
    assert 1.5 < toks.bytes_per_token < 5
    # the second call reuses the cache
    assert prepare_tokens(corpus["byte_dir"], vocab_size=320, log=lambda m: None) == corpus["tok_dir"]


def test_a_cut_short_token_shard_is_encoded_again_not_reused(tmp_path):
    """The byte shards' rule for the token shards: a .tok file whose size is not the one meta.json records (a copy
    cut short) was reused without a word, and a token model trained on it and scored its val BPB over fewer bytes."""
    byte_dir = prepare(DataArgs(data_path=write_corpus(tmp_path, n_train=6, n_val=2, doc_bytes=600),
                                data_dir=str(tmp_path / "cache")), log=lambda m: None)
    tok_dir = prepare_tokens(byte_dir, vocab_size=300, log=lambda m: None)
    whole = {sp: (tok_dir / f"{sp}.tok").read_bytes() for sp in ("train", "val")}
    tokenizer = tok_dir / "tokenizer.json"
    for sp in ("val", "train"):
        with open(tok_dir / f"{sp}.tok", "r+b") as f:
            f.truncate(len(whole[sp]) - 20)  # whole tokens gone: it still opens as a token shard
        logs = []
        assert prepare_tokens(byte_dir, vocab_size=300, log=logs.append) == tok_dir
        assert sum("preparing it again" in m for m in logs) == 1, logs
        assert {s: (tok_dir / f"{s}.tok").read_bytes() for s in ("train", "val")} == whole
        # a resumed run's tokenizer looks for the cache its tokenizer was trained in: a cut one is not taken either
        with open(tok_dir / f"{sp}.tok", "r+b") as f:
            f.truncate(len(whole[sp]) - 20)
        got = prepare_tokens(byte_dir, tokenizer_path=tokenizer, log=lambda m: None)
        assert len(open_token_shards(got).val) * 2 == len(whole["val"])
        assert len(open_token_shards(got).train) * 2 == len(whole["train"])
        prepare_tokens(byte_dir, vocab_size=300, log=lambda m: None)  # mends tok_dir for the next round


def test_bpe_model_trains_and_exact_val_bpb_counts_every_byte(corpus):
    toks = open_token_shards(corpus["tok_dir"])
    shards = open_shards(corpus["byte_dir"])
    torch.manual_seed(0)
    model = create_model("tiny", model="bpe", d_model=64, n_layers=2, n_heads=2, vocab_size=toks.bpe.vocab_size)
    model.set_tokenizer(toks.bpe)
    sampler = TokenWindowSampler(toks.train, toks.bpe, seq_len=32, batch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = evaluate_token_bpb(model, toks.val, 32, 16, "cpu")
    losses = []
    for step in range(25):
        x, y = sampler.get(step)
        out = model(x, y)
        # training-time BPB uses the exact bytes of this batch's targets
        nb = model.token_nbytes[y].sum().item()
        assert out["n_bytes"].item() == nb
        assert out["bpb"].item() == pytest.approx(out["loss"].item() * y.numel() / nb / np.log(2), rel=1e-4)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    after = evaluate_token_bpb(model, toks.val, 32, 16, "cpu")
    # every val byte except the first (the leading DOC_SEP, never a target) is scored exactly once
    assert after["bytes"] == len(shards.val) - 1
    assert after["tokens"] == len(toks.val) - 1
    assert after["bpb"] < before["bpb"] - 0.5
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # bits / bytes, not bits / tokens
    assert after["bpb"] == pytest.approx(after["bits"] / after["bytes"])


def test_bpe_checkpoint_carries_its_tokenizer(corpus, tmp_path):
    from safetensors.torch import load_model, save_model

    toks = open_token_shards(corpus["tok_dir"])
    model = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=toks.bpe.vocab_size)
    model.set_tokenizer(toks.bpe)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=toks.bpe.vocab_size)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert fresh.bpe.to_str() == toks.bpe.to_str()
    assert torch.equal(fresh.token_nbytes, model.token_nbytes)
    save_model(model, str(tmp_path / "m.safetensors"))
    fresh2 = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=toks.bpe.vocab_size)
    load_model(fresh2, str(tmp_path / "m.safetensors"))
    assert fresh2.bpe.to_str() == toks.bpe.to_str()


def test_bpe_generate_bytes_and_stops(corpus):
    toks = open_token_shards(corpus["tok_dir"])
    model = create_model("tiny", model="bpe", d_model=32, n_layers=2, n_heads=2, vocab_size=toks.bpe.vocab_size)
    model.set_tokenizer(toks.bpe)
    prompts = [b"\x00Q: What is 2 + 2?\nA: ", b"The "]
    kv = model.generate(prompts, max_new_bytes=17, greedy=True)
    rc = model.generate(prompts, max_new_bytes=17, greedy=True, decoder="recompute")
    assert kv == rc
    assert all(isinstance(o, bytes) and len(o) <= 17 for o in kv)
    one = model.generate(b"The ", max_new_bytes=9, temperature=1.0, top_k=20, seed=3)
    assert isinstance(one, bytes) and len(one) <= 9
    assert one == model.generate(b"The ", max_new_bytes=9, temperature=1.0, top_k=20, seed=3)
    # a stop string ends the row and is not part of the result
    full = model.generate(b"The ", max_new_bytes=40, temperature=1.0, seed=1)
    if len(full) > 3:
        stop = full[2:4]
        cut = model.generate(b"The ", max_new_bytes=40, temperature=1.0, seed=1, stop=[stop])
        assert cut == full[:full.find(stop)]
    # the byte decoders' speed options are taken and unused; a misspelt option is refused as the byte models do
    assert model.generate(b"The ", max_new_bytes=9, greedy=True, cuda_graphs=False, compile=False) == \
        model.generate(b"The ", max_new_bytes=9, greedy=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'topk'"):
        model.generate(b"The ", max_new_bytes=9, topk=3)
    # ... and at any other value they ask for what the token decoder does not do: refused, not ignored (an audit:
    # compile=True, unroll=0, fused_local_step=True passed silently, while the CLI refused --compile for BPE)
    for kw in (dict(compile=True), dict(compile="bogus"), dict(unroll=0), dict(unroll=8), dict(fused_local_step=True),
               dict(fused_entropy_step=False), dict(entropy_branch=True)):
        (name, value), = kw.items()
        with pytest.raises(UserError, match=f"{name}={value!r} is a byte-model decoder option; the BPE model's"):
            model.generate(b"The ", max_new_bytes=9, **kw)
    with pytest.raises(UserError, match="max_new_bytes must be a whole number"):
        model.generate(b"The ", 1.5)


def test_token_task_batch_targets_answers_only(corpus):
    toks = open_token_shards(corpus["tok_dir"])
    bpe = toks.bpe
    x, y = make_token_task_batch(bpe, np.random.default_rng(0), 3, 96)
    assert x.shape == y.shape == (3, 96)
    row_x, row_y = x[0].tolist(), y[0].tolist()
    scored = [t for t in row_y if t != -100]
    assert scored and all(0 <= t < bpe.vocab_size for t in scored)
    text = bpe.decode(row_x)
    assert text.startswith(b"\x00Q: ") and b"\nA: " in text
    # the scored bytes are the answers and their newlines
    answer_bytes = bpe.decode(scored)
    assert answer_bytes.count(b"\n") == text.count(b"\nA: ") or answer_bytes.count(b"\n") == text.count(b"\nA: ") - 1
    assert b"Q:" not in answer_bytes


def test_bpe_needs_a_vocabulary():
    with pytest.raises(UserError, match="vocab_size"):
        create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2)


def test_mamba_trains_and_decodes_incrementally():
    torch.manual_seed(0)
    model = create_model("tiny", model="mamba", d_model=32, n_layers=2)
    text = np.frombuffer((b"the cat sat on the mat. " * 40), dtype=np.uint8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    first = last = None
    for step in range(30):
        offs = rng.integers(0, len(text) - 65, size=8)
        w = torch.from_numpy(text[offs[:, None] + np.arange(65)].astype(np.int64))
        out = model(w[:, :-1], w[:, 1:])
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out["bpb"].item()
        last = out["bpb"].item()
    assert last < first - 1.0
    p = model.count_parameters()
    assert p["total"] == sum(v for k, v in p.items() if k != "total")
    prompts = [b"the cat ", b"on the m"]
    cached = model.generate(prompts, max_new_bytes=12, greedy=True)
    ref = model.generate(prompts, max_new_bytes=12, greedy=True, decoder="recompute")
    assert cached == ref


def test_bpe_generate_inside_autocast_equals_fp32(corpus):
    toks = open_token_shards(corpus["tok_dir"])
    torch.manual_seed(0)
    model = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=toks.bpe.vocab_size)
    model.set_tokenizer(toks.bpe)
    model.eval()
    want = model.generate([b"The ", b"and"], max_new_bytes=10, greedy=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.generate([b"The ", b"and"], max_new_bytes=10, greedy=True)
    assert got == want and all(len(g) == 10 for g in got)


def test_generate_cli_on_a_bpe_checkpoint_decodes_its_tokens(corpus, tmp_path, capsys):
    """`ionllama generate` called the byte models' decoder on every checkpoint: a BPE checkpoint's token ids were
    read as bytes (a ValueError traceback when sampling, U+FFFD characters with --greedy; a new user's report). It
    now goes through model.generate, which encodes with the checkpoint's tokenizer and emits its tokens' bytes."""
    from ionllama.generation.cli import main

    toks = open_token_shards(corpus["tok_dir"])
    model = create_model("tiny", model="bpe", d_model=32, n_layers=2, n_heads=2, vocab_size=toks.bpe.vocab_size)
    model.set_tokenizer(toks.bpe)
    ck = tmp_path / "bpe.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, ck)
    for flags, kw in ((["--greedy"], dict(greedy=True)), (["--seed", "1", "--top_k", "20"], dict(seed=1, top_k=20))):
        assert main(["--checkpoint", str(ck), "--prompt", "The ", "--max_new_bytes", "24", "--device", "cpu",
                     "--no_prompt_echo", *flags]) == 0
        out = capsys.readouterr().out
        want = model.generate(b"The ", max_new_bytes=24, **kw)
        assert out == want.decode("utf-8", errors="replace") + "\n", (out, want)
    assert main(["--checkpoint", str(ck), "--prompt", "The ", "--max_new_bytes", "8", "--device", "cpu", "--greedy",
                 "--stats"]) == 0
    assert "token decoder with a KV cache)" in capsys.readouterr().err  # --stats: no byte runner to report on
    with pytest.raises(SystemExit) as e:  # the byte models' compiled decoder does not apply
        main(["--checkpoint", str(ck), "--prompt", "x", "--device", "cpu", "--compile", "default"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "leave it out for a BPE checkpoint" in err and "\n" not in err


def test_a_vocabulary_the_train_split_cannot_fill_names_the_size_it_can(corpus):
    """A small corpus yields fewer merges than --vocab_size asks for: the refusal used to say "resume with the same
    --vocab_size" on a fresh run, a fix that does not apply; now it names the size the data gives."""
    from ionllama.data.bpe import TokenTraining

    with pytest.raises(UserError, match=r"yields a tokenizer of only (\d+) tokens.*pass --vocab_size \1 or less"):
        TokenTraining(corpus["byte_dir"], vocab_size=60000, seq_len=32, batch_size=4, log=lambda m: None)


def test_byte_evaluators_score_a_bpe_model_per_byte():
    """The byte evaluators took a BPE model silently: evaluate_bpb fed byte values as token ids (11.7 bits/byte
    where the tokens give 4.8), evaluate_batches averaged per-batch bpb by token count. Both now go by bytes."""
    import math

    import torch.nn.functional as F

    from ionllama.eval.bpb import evaluate_batches, evaluate_bpb
    from ionllama.eval.lm import evaluate_bpb as any_model_bpb

    bpe = train_tokenizer([s.encode() for s in _snippets(8, 1000)], vocab_size=300)
    torch.manual_seed(0)
    m = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=bpe.vocab_size).eval()
    m.set_tokenizer(bpe)
    data = np.frombuffer(b"\x00" + "".join(_snippets(2, 300)).encode(), dtype=np.uint8)
    assert evaluate_bpb(m, data, 32, 2, "cpu") == any_model_bpb(m, data, 32, 2, "cpu")[0]
    # a cap of N bytes: the whole tokens within the first N + 1 bytes, as the trainer's --eval_bytes N (their bytes
    # but the leading one are scored: <= N, not exactly N, when a token crosses the cut)
    from ionllama.data.bpe import token_prefix_for_bytes

    prefix = token_prefix_for_bytes(bpe.encode(data), bpe.token_nbytes, 100)
    capped = evaluate_bpb(m, data, 32, 2, "cpu", max_bytes=100)
    assert capped["bytes"] == bpe.token_nbytes[prefix[1:]].sum() and 90 < capped["bytes"] <= 100

    ids = torch.as_tensor(bpe.encode(data), dtype=torch.long)
    batches = [(ids[None, s:s + 16], ids[None, s + 1:s + 17]) for s in (0, 16)]
    bits = nbytes = 0.0
    with torch.no_grad():
        for x, y in batches:
            bits += float(F.cross_entropy(m(x)["logits"][0].float(), y[0], reduction="sum")) / math.log(2)
            nbytes += float(bpe.token_nbytes[y[0].numpy()].sum())
    r = evaluate_batches(m, batches, "cpu")
    assert r["bytes"] == nbytes and r["bpb"] == pytest.approx(bits / nbytes, rel=1e-5)


def test_a_cut_short_tokenizer_copy_of_a_resumed_run_is_written_again(corpus):
    """A resumed BPE run writes its checkpoint's tokenizer beside the shards and reads it back; the file was written
    in place and kept once there: cut short (an interrupted write, or another rank reading it mid-write) every later
    resume failed with 'cannot read the tokenizer ... retrain it'."""
    from ionllama.data.bpe import TokenTraining

    first = TokenTraining(corpus["byte_dir"], vocab_size=320, seq_len=32, batch_size=4, log=lambda m: None)
    text = first.bpe.to_str()
    again = TokenTraining(corpus["byte_dir"], vocab_size=320, seq_len=32, batch_size=4, tokenizer_json=text,
                          log=lambda m: None)
    copy, = Path(corpus["byte_dir"]).glob(".tokenizer-*.json")
    assert copy.read_text(encoding="utf-8") == text
    copy.write_bytes(copy.read_bytes()[:100])  # cut short
    resumed = TokenTraining(corpus["byte_dir"], vocab_size=320, seq_len=32, batch_size=4, tokenizer_json=text,
                            log=lambda m: None)
    assert resumed.bpe.to_str() == again.bpe.to_str() == text and copy.read_text(encoding="utf-8") == text
    assert not list(Path(corpus["byte_dir"]).glob(".*.tmp-*"))


def test_bench_capped_bpb_of_a_bpe_model_scores_the_trainers_tokens(corpus):
    """The trainer's --eval_bytes N keeps the whole tokens (of the whole split's tokens) within the first N + 1 bytes;
    bench's --max_eval_bytes N cut the bytes to N + 1 first and encoded them, splitting the last token: the same
    cap gave 5.4252 over 700 bytes / 462 tokens against the trainer's 5.4211 over 699 / 461 (an audit). bench now
    reads on past the cap (TOKEN_CUT_MARGIN) and takes the trainer's token prefix."""
    from ionllama.data.bpe import TokenTraining
    from ionllama.eval import lm

    tt = TokenTraining(corpus["byte_dir"], vocab_size=320, seq_len=32, batch_size=4, log=lambda m: None)
    torch.manual_seed(0)
    model = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=tt.bpe.vocab_size)
    tt.attach(model)
    val = np.asarray(open_shards(corpus["byte_dir"]).val)
    differs_when_cut_first = 0
    ends = set(np.cumsum(tt.bpe.token_nbytes[np.asarray(open_token_shards(corpus["tok_dir"]).val)]).tolist())
    inside = next(n for n in range(500, 1500) if n + 1 not in ends)  # a cap inside a token, whatever the corpus
    for n in (300, 701, 1000, 1777, inside):
        want = tt.evaluate(model, 32, 4, "cpu", max_bytes=n)
        got, _ = lm.evaluate_bpb(model, val[:n + 1 + lm.TOKEN_CUT_MARGIN], 32, 4, "cpu", max_bytes=n)
        assert (got["bytes"], got["tokens"]) == (want["bytes"], want["tokens"]), n
        assert got["bpb"] == pytest.approx(want["bpb"], abs=1e-6), n
        cut_first, _ = lm.evaluate_bpb(model, val[:n + 1], 32, 4, "cpu")
        differs_when_cut_first += cut_first["tokens"] != want["tokens"] or cut_first["bytes"] != want["bytes"]
    assert differs_when_cut_first  # the old way, for contrast: some cap splits a token


def test_mamba_generates_past_the_first_cache_size(monkeypatch):
    """Caches start at generate.INITIAL_NEW_BYTES new bytes and grow: Mamba's state has no length, so passing that
    size changes nothing (a decoder without a length axis must not fail there)."""
    import importlib

    G = importlib.import_module("ionllama.generation.generate")
    torch.manual_seed(0)
    model = create_model("tiny", model="mamba", d_model=32, n_layers=2).eval()
    whole = model.generate([b"ab", b"a longer one"], max_new_bytes=30, greedy=True)
    monkeypatch.setattr(G, "INITIAL_NEW_BYTES", 2)
    assert model.generate([b"ab", b"a longer one"], max_new_bytes=30, greedy=True) == whole
    assert max(map(len, whole)) > 10


def test_bpe_token_cache_that_grows_gives_the_same_bytes(corpus, monkeypatch):
    """The BPE model's token KV cache starts at INITIAL_NEW_BYTES past the prompt and doubles (it was sized for
    max_new_bytes tokens up front): growing several times changes no byte, cached or recompute decoder."""
    import importlib

    G = importlib.import_module("ionllama.generation.generate")
    toks = open_token_shards(corpus["tok_dir"])
    torch.manual_seed(0)
    model = create_model("tiny", model="bpe", d_model=32, n_layers=2, n_heads=2, vocab_size=toks.bpe.vocab_size)
    model.set_tokenizer(toks.bpe)
    prompts = [b"The ", b"\x00Q: What is 2 + 2?\nA: "]
    for decoder in ("auto", "recompute"):
        whole = model.generate(prompts, max_new_bytes=40, temperature=1.0, seed=2, decoder=decoder)
        with monkeypatch.context() as mp:
            mp.setattr(G, "INITIAL_NEW_BYTES", 2)
            assert model.generate(prompts, max_new_bytes=40, temperature=1.0, seed=2, decoder=decoder) == whole
        assert max(map(len, whole)) > 10, whole

def _task_tokenizer():
    rng = np.random.default_rng(0)
    docs = []
    for i in range(3000):  # task examples as the task stage encodes them, and text where " 12" is one piece
        e = T.sample_example(rng, T.TASKS[i % len(T.TASKS)], "train")
        docs += [e.prompt, e.answer + b"\n"]
    docs += [f"In {1900 + i} there were {i * 7} people and {i % 13} dogs.".encode() for i in range(500)]
    return train_tokenizer(docs, vocab_size=600)


def test_bpe_few_shot_prompt_is_tokenized_as_task_training_tokenizes_it(monkeypatch):
    """--task_shots K gave a token model its solved examples encoded whole ("A", ":", " 12"), while task training
    encodes prompt and answer apart ("A", ":", " " | "12") and the question is answered after a lone " " token."""
    from ionllama.eval.task_eval import run_tasks
    from ionllama.model.bpe_gpt import BPETransformer

    bpe = _task_tokenizer()
    torch.manual_seed(0)
    m = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=bpe.vocab_size).eval()
    m.set_tokenizer(bpe)
    seen = []
    real = BPETransformer._decode

    def spy(self, decoder, rows, seqs, *args):
        seen.extend([list(s) for s in seqs])
        return real(self, decoder, rows, seqs, *args)

    monkeypatch.setattr(BPETransformer, "_decode", spy)
    run_tasks(m, "cpu", n=3, max_digits=2, shots=2, tasks=("add",), batch_size=8)
    shots = T.make_task_examples("add", "train", 2, seed=1234 + 7919)
    want_prefix = [bpe.sep_id]
    for e in shots:
        p, a = bpe.encode_docs([e.prompt, e.answer + b"\n"])
        want_prefix += p.tolist() + a.tolist() + [bpe.sep_id]
    questions = [e for d in (1, 2) for e in T.make_task_examples("add", "test", 3, 1234, digits=d)]
    assert len(seen) == len(questions)
    for s, q in zip(seen, questions):
        assert s == want_prefix + bpe.encode_docs([q.prompt])[0].tolist()


def test_a_token_model_never_scores_bytes_past_the_cap():
    """token_prefix_for_bytes took at least two tokens: a cap of 1 byte scored 3 (a byte model scores exactly 1)."""
    from ionllama.eval.bpb import evaluate_bpb

    bpe = train_tokenizer([b"the cat sat on the mat. " * 50], vocab_size=300)
    torch.manual_seed(0)
    m = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=bpe.vocab_size).eval()
    m.set_tokenizer(bpe)
    data = np.frombuffer(b"\x00the cat sat on the mat. the cat", dtype=np.uint8)
    for cap in (1, 2, 3, 10, 20):
        try:
            r = evaluate_bpb(m, data, 8, 2, "cpu", max_bytes=cap)
        except UserError as e:
            assert "raise the cap" in str(e)
            continue
        assert r["bytes"] <= cap


def test_the_cap_a_token_refusal_names_is_enough():
    """The refusal named ends[1] bytes, one more than the cap that holds the second token (a cap of N reads N + 1)."""
    import re

    from ionllama.data.bpe import token_prefix_for_bytes

    nbytes, toks = np.array([1, 3, 2]), np.array([0, 1, 2])
    with pytest.raises(UserError) as e:
        token_prefix_for_bytes(toks, nbytes, 2)
    need = int(re.search(r"a cap of (\d+) would", str(e.value)).group(1))
    assert list(token_prefix_for_bytes(toks, nbytes, need)) == [0, 1] and "--eval_bytes" in str(e.value)


def test_prompt_ids_that_are_not_one_list_per_row_are_one_error():
    """generate(prompt_ids=[1, 2, 3]) (a flat list for one prompt) was a TypeError traceback."""
    bpe = train_tokenizer([b"the cat sat on the mat. " * 50], vocab_size=300)
    torch.manual_seed(0)
    m = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=bpe.vocab_size).eval()
    m.set_tokenizer(bpe)
    good = [bpe.sep_id] + bpe.encode_docs([b"the cat"])[0].tolist()
    assert isinstance(m.generate([b"\x00the cat"], max_new_bytes=3, greedy=True, prompt_ids=[good])[0], bytes)
    for bad in (good, [good, good], [["x"]]):
        with pytest.raises(UserError, match="prompt_ids must hold"):
            m.generate([b"\x00the cat"], max_new_bytes=3, greedy=True, prompt_ids=bad)


def test_evaluate_batches_gives_a_bpe_model_bytes_per_token_as_bytes_per_patch():
    """A token is the BPE model's patch: evaluate_bpb reports bytes/token as bytes_per_patch, but evaluate_batches
    divided the input *tokens* by the tokens (n_patches) and reported 1.0 for any tokenizer; the model's
    out['input_bytes'] (the bytes its input tokens hold) was computed for this and read by nothing."""
    from ionllama.eval.bpb import evaluate_batches

    bpe = train_tokenizer([s.encode() for s in _snippets(8, 1000)], vocab_size=300)
    torch.manual_seed(0)
    m = create_model("tiny", model="bpe", d_model=32, n_layers=1, n_heads=2, vocab_size=bpe.vocab_size).eval()
    m.set_tokenizer(bpe)
    ids = torch.as_tensor(bpe.encode(b"\x00" + "".join(_snippets(2, 300)).encode()), dtype=torch.long)
    batches = [(ids[None, s:s + 16], ids[None, s + 1:s + 17]) for s in (0, 16)]
    in_bytes = sum(int(bpe.token_nbytes[x[0].numpy()].sum()) for x, _ in batches)
    r = evaluate_batches(m, batches, "cpu")
    assert r["bytes_per_patch"] == pytest.approx(in_bytes / 32) and r["bytes_per_patch"] > 1.2
