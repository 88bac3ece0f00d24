"""compile_model: an exported ONNX model + thresholds → the same model with TopThetaAttention sites."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from .errors import ModelError, NoSitesError, RewriteError, ThresholdsError, ToptError
from .frontends import onnx as onnx_frontend
from .match import Site, find_sites, fingerprint
from .rewrite import rewrite
from .thresholds.schema import ThresholdTable

EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes of weights; protobuf's limit is 2 GiB


@dataclasses.dataclass
class CompileOptions:
    """How to compile. Exactly one of `thresholds` (a t.json path or table) and `theta` is needed."""

    thresholds: str | os.PathLike | ThresholdTable | None = None
    theta: float | None = None        # uniform θ for every head/length (-inf: dense-equivalent)
    k: int = 0                        # with theta: rows with n <= k stay dense
    placement: str = "post_softmax"   # with theta
    compensation: str = "vmc"         # with theta
    allow_no_sites: bool = False
    check: bool = True                # onnx.checker (full_check) on the result
    stats: bool = False               # expose each site's stats [B, Hq, 6] as output topt.<site>.stats
    dense_prompt: bool = False        # prompts (calls with S > 1) keep every key; only decode steps drop
    same_weights: bool = False        # a t.json of another export of the same weights (fp16, genai folder):
                                      # sites must fit by id and heads; fingerprint and dtype are not checked


@dataclasses.dataclass
class Report:
    """What a compile (or a listing) found: every site, matched as what or dense and why."""

    input: str
    fingerprint: str
    sites: list[Site]
    output: str | None = None
    thresholds: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def matched(self) -> list[Site]:
        return [s for s in self.sites if s.matched]

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "fingerprint": self.fingerprint,
                "thresholds": self.thresholds, "matched": len(self.matched),
                "dense": len(self.sites) - len(self.matched), "seconds": self.seconds,
                "sites": [s.to_dict() for s in self.sites]}

    def to_text(self) -> str:
        lines = [f"{self.input}: {len(self.matched)} of {len(self.sites)} attention sites matched "
                 f"(fingerprint {self.fingerprint})"]
        for s in self.sites:
            if s.matched:
                v = s.variant
                form = s.form + ("" if s.form == "Attention" else _gqa_text(v) if s.form == "GroupQueryAttention" else
                                 f" [{v.get('key_layout', 'BHSD')}, scale on {_scaled_on(v)}, mask {s.mask}"
                                 f"{', fp32 softmax' if v.get('upcast') or v.get('casts_out') else ''}"
                                 f"{', IsNaN guard' if v.get('nan_guard') else ''}]")
                lines.append(f"  {s.id:8} matched  {form}: Hq={s.Hq} Hkv={s.Hkv} Dh={s.Dh} {s.dtype} "
                             f"mask={s.mask} causal={s.is_causal} kv_cache={'yes' if s.kv_cache else 'no'}"
                             f"{' GQA-expanded' if v.get('k_repeat') else ''}  ({s.anchor})")
            else:
                lines.append(f"  {s.id:8} dense    {s.form}: {s.reason}  ({s.anchor})")
        if self.output:
            lines.append(f"wrote {self.output}" + (f" with thresholds from {self.thresholds}" if self.thresholds else ""))
        return "\n".join(lines)


def _gqa_text(v: dict) -> str:
    rotary = f"rotary{' interleaved' if v.get('rotary_interleaved') else ''} dim {v.get('rotary_dim')}" \
        if v.get("do_rotary") else "no rotary"
    return f" [{'packed QKV' if v.get('packed_qkv') else 'Q, K, V'}, {rotary}, KV {v.get('kv_layout')}]"


def _scaled_on(v: dict) -> str:
    on = [name for name, tag in (("q", "q_scaling"), ("k", "k_scaling"), ("qk", "qk_scaling")) if v.get(tag)]
    return "+".join(f"{n}({v[f'{n}_scaling']})" for n in on) if on else "none"


def list_sites(model_path: str | os.PathLike) -> Report:
    """The sites of a model, without thresholds (what calibration needs)."""
    t0 = time.perf_counter()
    model = onnx_frontend.load(model_path)
    t1 = time.perf_counter()
    sites = find_sites(model)
    return Report(os.fspath(model_path), fingerprint(model, sites), sites,
                  seconds={"load": round(t1 - t0, 3), "match": round(time.perf_counter() - t1, 3)})


def compile_model(model_path: str | os.PathLike, output_path: str | os.PathLike,
                  options: CompileOptions | None = None, **kwargs) -> Report:
    """Compiles `model_path` into `output_path` (written atomically; the input is never touched).

    `kwargs` are CompileOptions fields, e.g. `compile_model(a, b, thresholds="t.json")` or
    `compile_model(a, b, theta=float("-inf"))`. Raises a ToptError subclass with a one-line message.
    """
    options = dataclasses.replace(options or CompileOptions(), **kwargs)
    model_path, output_path = Path(model_path), Path(output_path)
    if output_path.resolve() == model_path.resolve():
        raise ModelError(f"{output_path}: the output would overwrite the input model")
    t = {"start": time.perf_counter()}
    model = onnx_frontend.load(model_path)
    t["load"] = time.perf_counter()
    sites = find_sites(model)
    fp = fingerprint(model, sites)
    matched = [s for s in sites if s.matched]
    t["match"] = time.perf_counter()
    report = Report(os.fspath(model_path), fp, sites)
    if not matched and not options.allow_no_sites:
        dense = f"; {len(sites)} kept dense, first: {sites[0].id}: {sites[0].reason}" if sites else ""
        raise NoSitesError(f"{model_path}: no attention site matched{dense} (use --allow-no-sites to write it unchanged)")
    table = resolve_thresholds(options, fp, sites)
    table.check_fits(fp, sites, same_weights=options.same_weights)
    rewrite(model, sites, table, stats=options.stats, dense_prompt=options.dense_prompt)
    t["rewrite"] = time.perf_counter()
    _save(model, output_path, options.check)
    t["save"] = time.perf_counter()
    report.output = os.fspath(output_path)
    report.thresholds = os.fspath(options.thresholds) if isinstance(options.thresholds, (str, os.PathLike)) else \
        (f"uniform theta={options.theta}" if options.theta is not None else "table")
    steps = list(t)
    report.seconds = {b: round(t[b] - t[a], 3) for a, b in zip(steps, steps[1:])}
    report.seconds["total"] = round(t["save"] - t["start"], 3)
    return report


def resolve_thresholds(options: CompileOptions, fp: str, sites: list[Site]) -> ThresholdTable:
    """The table compile options ask for: a t.json (path or table) or a uniform θ for every site."""
    if (options.thresholds is None) == (options.theta is None):
        raise ThresholdsError("thresholds: expected exactly one of a t.json file and a uniform theta")
    if options.theta is not None:
        if options.theta != options.theta:
            raise ThresholdsError("theta: expected a number or -inf, got nan")
        return ThresholdTable.uniform(fp, sites, options.theta, k=options.k, placement=options.placement,
                                      compensation=options.compensation).validate()
    if isinstance(options.thresholds, ThresholdTable):
        return options.thresholds.validate()
    return ThresholdTable.load(options.thresholds)


def _save(model: ir.Model, path: Path, check: bool) -> None:
    """Checks, then writes `path` atomically: a temp dir beside it, then os.replace (data file first)."""
    if check:  # weights are the input's, unchanged: check the graph without copying them
        _c_api_utils.call_onnx_api(_check, model)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    # an input with external data (onnxruntime-genai's model.onnx.data) keeps it: its references are relative
    data_name = path.name + ".data" if weights > EXTERNAL_DATA_ABOVE or external else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ir.save(model, tmpdir / path.name, external_data=data_name)
        if data_name:
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
    except OSError as e:
        raise ToptError(f"{path}: cannot write the output ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _check(proto: onnx.ModelProto) -> None:
    # Small initializers stay in the proto; those in an external data file (onnxruntime-genai's
    # model.onnx.data) cannot be found from a proto: call_onnx_api made them graph inputs, keep those.
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        proto.graph.initializer.remove(tensor)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # checker and shape-inference errors alike
        raise RewriteError(f"the rewritten model fails onnx.checker: {str(e).strip().splitlines()[0]}") from None


def report_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=1, default=str)
