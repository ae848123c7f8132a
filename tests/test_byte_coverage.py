"""scripts/byte_coverage.py: the share of evaluation bytes whose value training never or rarely shows."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bc():
    spec = importlib.util.spec_from_file_location("byte_coverage", ROOT / "scripts" / "byte_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_counts_unseen_rare_and_non_ascii_bytes(tmp_path, bc, capsys):
    train = _jsonl(tmp_path / "train.jsonl", ["ab" * 100, "a"])  # 'a' 101 times, 'b' 100 times
    ev = _jsonl(tmp_path / "eval.jsonl", ["aab", "zé"])  # 6 bytes: z unseen, é two unseen non-ASCII bytes
    tr, n_tr = bc.byte_histogram(train, "text")
    e, n_e = bc.byte_histogram(ev, "text")
    assert (n_tr, n_e) == (201, 6)
    c = bc.coverage(tr, n_tr, e, n_e, rare=101)
    assert c["eval_frac_unseen"] == pytest.approx(3 / 6)  # z and the two bytes of é
    assert c["eval_frac_rare_lt101"] == pytest.approx(4 / 6)  # those three and b (100 < 101)
    assert c["eval_frac_non_ascii"] == pytest.approx(2 / 6) and c["train_frac_non_ascii"] == 0
    # the limit takes the first N bytes, as the runner's eval sets do
    assert bc.byte_histogram(ev, "text", limit=2)[1] == 2
    assert bc.main([train, ev]) == 0 and "eval_frac_unseen: 0.5\n" in capsys.readouterr().out
