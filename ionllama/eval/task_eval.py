"""Character tasks and arithmetic: exact match under greedy decoding on the held-out test split,
with n and a 95 % Wilson interval per task (and per digit count for arithmetic)."""
from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import torch

from ..data import tasks as T
from ..fsutil import atomic_write
from .lm import autocast_ctx, eval_mode
from .stats import accuracy_record


@torch.no_grad()
def _greedy_fallback(model, prompts: list[bytes], max_new_bytes: int, device) -> list[bytes]:
    """Plain greedy decoding by full forwards, for models whose generate() is unavailable."""
    outs = []
    for p in prompts:
        seq = list(p)
        new = bytearray()
        for _ in range(max_new_bytes):
            x = torch.tensor([seq], dtype=torch.long, device=device)
            b = int(model(x)["logits"][0, -1].float().argmax())
            if b == T.DOC_SEP or b == ord("\n"):
                break
            new.append(b)
            seq.append(b)
        outs.append(bytes(new))
    return outs


def generate_greedy(model, prompts: list[bytes], max_new_bytes: int, device,
                    amp_dtype=None, prompt_ids=None) -> tuple[list[bytes], list[bool], str]:
    """-> (continuations, stopped, method): stopped[i] says whether row i ended at a stop byte ('\n' or DOC_SEP, not
    in its continuation) rather than at max_new_bytes. Uses model.generate (cached decoding) when it works."""
    if hasattr(model, "generate"):  # the cached decoders run in the model's own dtype: no autocast around them
        try:
            kw = {"prompt_ids": prompt_ids} if prompt_ids is not None else {}
            out, info = model.generate(list(prompts), max_new_bytes=max_new_bytes, greedy=True, stop=[b"\n"],
                                       return_info=True, **kw)
            outs, stopped = [bytes(o) for o in out], [r in ("stop", "doc_sep") for r in info["stop_reasons"]]
            return outs, stopped, "model.generate"
        except (ImportError, NotImplementedError):  # no generation module / decoder for this model
            pass
    with autocast_ctx(device, amp_dtype):
        outs = _greedy_fallback(model, prompts, max_new_bytes, device)
    method = "fallback greedy (full forward per byte)"
    stopped = [len(o) < max_new_bytes for o in outs]  # it breaks before the budget only at a stop byte
    return outs, stopped, method


def judge(output: bytes, stopped: bool, answer: bytes) -> tuple[bool, bytes, bool]:
    """-> (correct, the output as scored, stopped within its own budget). A right answer is the answer followed by a
    stop byte within one byte beyond it, so a space before or after the answer makes it wrong (T.is_correct alone
    ignores surrounding spaces; the one-byte budget leaves no room for them): the output is judged as if generated with
    exactly that budget, whatever budget the batch it ran in had. (With a batch's budget, the longest answer's
    budget, "7 and more" was cut to "7 " and counted right alone, and "7 a", wrong, in a batch with a longer
    answer: the score moved with --gen_batch.)"""
    own = len(answer) + 1
    if stopped and len(output) < own:  # its stop byte came within the budget
        return T.is_correct(output, answer), output, True
    return False, output[:own], False


def _shot_examples(k: int, seed: int, task: str) -> list:
    return T.make_task_examples(task, "train", k, seed=seed + 7919) if k > 0 else []


def _shots_prefix(k: int, seed: int, task: str) -> bytes:
    """k solved *train* examples in the training format, before the question (k = 0: zero-shot)."""
    return T.DOC_SEP_BYTES + b"".join(e.text + T.DOC_SEP_BYTES for e in _shot_examples(k, seed, task))


def token_prompt(bpe, shots: list, prompt: bytes) -> list[int]:
    """A token model's prompt as its task training tokenizes it (make_token_task_batch, experiment task_batch):
    separator, then each solved example's prompt and answer + newline encoded apart, then the question's prompt.
    Encoding the bytes whole merged " 12" into one token in the solved examples while the question must be answered
    after a lone " " token."""
    ids = [bpe.sep_id]
    for e in shots:
        p, a = bpe.encode_docs([e.prompt, e.answer + b"\n"])
        ids += p.tolist() + a.tolist() + [bpe.sep_id]
    return ids + bpe.encode_docs([prompt])[0].tolist()


def _score(model, examples: list[T.TaskExample], prefix: bytes, device, batch_size: int, amp_dtype,
           n_samples: int = 3, outputs: list | None = None, shots: list | None = None) -> tuple[dict, str]:
    """outputs: when a list, every example's row is appended to it (output_row)."""
    correct = 0
    samples = []
    method = ""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        # one byte beyond the longest answer: a right answer must be followed by a stop byte (judge())
        max_new = max(len(e.answer) for e in chunk) + 1
        ids = ([token_prompt(model.bpe, shots or [], e.prompt) for e in chunk]
               if getattr(model, "token_level", False) else None)
        outs, stopped, method = generate_greedy(model, [prefix + e.prompt for e in chunk], max_new, device,
                                                amp_dtype, prompt_ids=ids)
        for e, o, st in zip(chunk, outs, stopped):
            # the row keeps judge()'s own-budget stop flag: the batch's made the stored rows differ with --gen_batch
            ok, o, st = judge(o, st, e.answer)
            correct += ok
            if len(samples) < n_samples:
                samples.append({"prompt": e.prompt.decode("utf-8", "replace"), "answer": e.answer.decode(),
                                "output": o.decode("utf-8", "replace"), "correct": bool(ok)})
            if outputs is not None:
                outputs.append(output_row(e, o, st, ok, len(prefix)))
    rec = accuracy_record(correct, len(examples))
    rec["majority_baseline"] = majority_baseline(examples)
    rec["samples"] = samples
    return rec, method


def output_row(e: T.TaskExample, scored: bytes, stopped: bool, ok: bool, prefix_len: int) -> dict:
    """One scored example, as the error analysis (scripts/task_errors.py) reads it. answer_at: the index of the answer's
    first byte in the bytes given to generate() (the shots prefix, then the prompt): with fixed patches, patch starts
    are the multiples of the patch size in that index, so an error's digit can be placed within its patch."""
    return {"task": e.task, "digits": e.digits, "prompt": e.prompt.decode("utf-8", "replace"),
            "answer": e.answer.decode("utf-8", "replace"), "output": scored.decode("utf-8", "replace"),
            "output_hex": scored.hex(), "stopped": bool(stopped), "correct": bool(ok),
            "answer_at": prefix_len + len(e.prompt)}


OUTPUTS_FILE = "task_outputs.jsonl.gz"


def write_outputs(path: str | Path, outputs: list[dict]) -> Path:
    """Every scored example, one JSON line each, gzipped (mtime 0: the same rows give the same file), written
    atomically."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outputs).encode("utf-8")
    return atomic_write(path, gzip.compress(lines, mtime=0))


def read_outputs(path: str | Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def majority_baseline(examples: list[T.TaskExample]) -> dict | None:
    """What always giving the most common answer of these examples would score (the floor a model that
    learned only the answer distribution reaches; e.g. '1' for letter counting)."""
    if not examples:
        return None
    answer, k = Counter(e.answer for e in examples).most_common(1)[0]
    if k == 1 and len(examples) > 1:  # every answer differs (spelling, reversal): the floor is 1/n
        return {"answer": None, "accuracy": 1 / len(examples)}
    return {"answer": answer.decode("utf-8", "replace"), "accuracy": k / len(examples)}


def run_tasks(model, device, n: int = 100, max_digits: int = 4, seed: int = 1234, shots: int = 0,
              trained_on_tasks: bool = False, split: str = "test", batch_size: int = 32,
              tasks: tuple[str, ...] = T.TASKS, amp_dtype=None, keep_outputs: bool = False) -> dict:
    """n examples per character task and n per (arithmetic task, digit count), all from `split`. keep_outputs: the
    result also holds "outputs", every example's row (output_row), for error analysis; callers write it to a file of
    its own (task_outputs.jsonl.gz), since the per-task records keep only a few samples."""
    t0 = time.perf_counter()
    with eval_mode(model):  # the mode it had comes back: a caller that trains on keeps its dropout
        per_task: dict[str, dict] = {}
        outputs: list | None = [] if keep_outputs else None
        method = ""
        for task in tasks:
            prefix, shot_ex = _shots_prefix(shots, seed, task), _shot_examples(shots, seed, task)
            if task in T.CHAR_TASKS:
                ex = T.make_task_examples(task, split, n, seed)
                per_task[task], method = _score(model, ex, prefix, device, batch_size, amp_dtype, outputs=outputs,
                                                shots=shot_ex)
                continue
            by_digits, c_all, n_all = {}, 0, 0
            for d in range(1, max_digits + 1):
                ex = T.make_task_examples(task, split, n, seed, digits=d)
                rec, method = _score(model, ex, prefix, device, batch_size, amp_dtype, n_samples=1, outputs=outputs,
                                     shots=shot_ex)
                by_digits[str(d)] = rec
                c_all, n_all = c_all + rec["correct"], n_all + rec["n"]
            all_ex = [e for d in range(1, max_digits + 1) for e in T.make_task_examples(task, split, n, seed, digits=d)]
            per_task[task] = {**accuracy_record(c_all, n_all), "majority_baseline": majority_baseline(all_ex),
                              "by_digits": by_digits}
    if shots > 0:
        label = f"{shots}-shot" + (" (in-format: the checkpoint was trained on task data)" if trained_on_tasks else "")
    else:
        label = "in_format" if trained_on_tasks else "zero_shot"
    result = {
        "label": label,
        "note": ("trained on the task format (held-out test words/operands)" if trained_on_tasks else
                 "the checkpoint never saw the task format in training"),
        "split": split, "shots": shots, "seed": seed, "n_per_cell": n, "max_digits": max_digits,
        "scoring": "exact match of the greedy continuation up to the first '\\n' or DOC_SEP, which must come within "
                   "one byte past the answer (whatever the batch); 95% Wilson CI",
        "generation": method, "seconds": time.perf_counter() - t0, "per_task": per_task,
    }
    if outputs is not None:
        result["outputs"] = outputs
    return result

