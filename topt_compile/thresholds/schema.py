"""t.json: calibrated thresholds per attention site, versioned, validated field by field.

```json
{"format": "topt-thresholds", "version": 1,
 "model": {"fingerprint": "3f2a…", "sites": 30},
 "calibration": {"dataset": "arc-challenge", "samples": 24, "sigma": 0.1, "notes": ""},
 "sites": {"layer0": {"Hq": 9, "Hkv": 3, "k": 64, "placement": "post_softmax", "compensation": "vmc",
                      "threshold_lengths": [0, 16, 32], "thresholds": [[…L…] × Hq],
                      "sdc_log_mass": null, "calibrated_max_length": 1327, "dtype": "float32"}}}
```
Every error is one line naming the field: `sites.layer3.thresholds[2]: expected 5 values, got 4`.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from typing import Any

from ..errors import ThresholdsError
from ..ops.schema import Attributes

FORMAT, VERSION = "topt-thresholds", 1


@dataclasses.dataclass
class SiteThresholds:
    Hq: int
    Hkv: int
    threshold_lengths: list[int]
    thresholds: list[list[float]]               # [Hq][L]
    k: int = 0
    placement: str = "post_softmax"
    compensation: str = "vmc"
    sdc_log_mass: list[list[float]] | None = None  # [Hq][L], for sdc_calibrated
    calibrated_max_length: int = 0
    dtype: str | None = None                    # the site's dtype at calibration, if known

    def validate(self, where: str) -> "SiteThresholds":
        _expect(isinstance(self.Hq, int) and self.Hq > 0, f"{where}.Hq", "a positive integer", self.Hq)
        _expect(isinstance(self.Hkv, int) and self.Hkv > 0 and self.Hq % self.Hkv == 0, f"{where}.Hkv",
                f"a positive divisor of Hq={self.Hq}", self.Hkv)
        lengths = self.threshold_lengths
        _expect(isinstance(lengths, list) and len(lengths) >= 1 and all(isinstance(n, int) and n >= 0 for n in lengths),
                f"{where}.threshold_lengths", "a non-empty list of integers >= 0", lengths)
        _expect(all(a < b for a, b in zip(lengths, lengths[1:])), f"{where}.threshold_lengths", "strictly increasing", lengths)
        self._table(self.thresholds, f"{where}.thresholds", allow_inf=True)
        if self.sdc_log_mass is not None:
            self._table(self.sdc_log_mass, f"{where}.sdc_log_mass", allow_inf=False)
        try:
            Attributes(k=self.k, placement=self.placement, compensation=self.compensation,
                       calibrated_max_length=self.calibrated_max_length).validate()
        except (ValueError, TypeError) as e:
            raise ThresholdsError(f"{where}.{e}") from None
        _expect(isinstance(self.calibrated_max_length, int) and self.calibrated_max_length >= 0,
                f"{where}.calibrated_max_length", "an integer >= 0", self.calibrated_max_length)
        needs_mass = "sdc_calibrated" in self.compensation
        _expect(needs_mass == (self.sdc_log_mass is not None), f"{where}.sdc_log_mass",
                "present exactly when compensation has sdc_calibrated", "present" if self.sdc_log_mass else "absent")
        return self

    def _table(self, table, where, allow_inf):
        L = len(self.threshold_lengths)
        _expect(isinstance(table, list) and len(table) == self.Hq, where, f"{self.Hq} rows (Hq)",
                len(table) if isinstance(table, list) else type(table).__name__)
        for h, row in enumerate(table):
            _expect(isinstance(row, list) and len(row) == L, f"{where}[{h}]", f"{L} values (one per threshold length)",
                    len(row) if isinstance(row, list) else type(row).__name__)
            for x in row:
                ok = isinstance(x, (int, float)) and not math.isnan(x) and (allow_inf or math.isfinite(x))
                _expect(ok, f"{where}[{h}]", "numbers (no NaN)" + ("" if allow_inf else ", finite"), x)


@dataclasses.dataclass
class ThresholdTable:
    fingerprint: str
    sites: dict[str, SiteThresholds]
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # free-form description
    version: int = VERSION

    @classmethod
    def uniform(cls, fingerprint: str, sites, theta: float, **attrs) -> "ThresholdTable":
        """One θ for every head and length of every matched site (θ = -inf: dense-equivalent)."""
        return cls(fingerprint, {s.id: SiteThresholds(s.Hq, s.Hkv, [0], [[float(theta)]] * s.Hq, dtype=s.dtype, **attrs)
                                 for s in sites if s.matched},
                   calibration={"dataset": f"uniform theta={theta}"})

    def validate(self) -> "ThresholdTable":
        _expect(self.version == VERSION, "version", f"{VERSION}", self.version)
        _expect(isinstance(self.sites, dict), "sites", "an object keyed by site id", type(self.sites).__name__)
        for sid, site in self.sites.items():
            site.validate(f"sites.{sid}")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version,
                "model": {"fingerprint": self.fingerprint, "sites": len(self.sites)},
                "calibration": self.calibration,
                "sites": {sid: _jsonable(dataclasses.asdict(s)) for sid, s in self.sites.items()}}

    @classmethod
    def from_json(cls, data: Any) -> "ThresholdTable":
        _expect(isinstance(data, dict), "(top level)", "a JSON object", type(data).__name__)
        _expect(data.get("format") == FORMAT, "format", repr(FORMAT), data.get("format"))
        _expect(data.get("version") == VERSION, "version", f"{VERSION}", data.get("version"))
        model = data.get("model")
        _expect(isinstance(model, dict) and isinstance(model.get("fingerprint"), str), "model.fingerprint", "a string",
                None if not isinstance(model, dict) else model.get("fingerprint"))
        sites = data.get("sites")
        _expect(isinstance(sites, dict) and sites, "sites", "a non-empty object keyed by site id", sites)
        fields = {f.name for f in dataclasses.fields(SiteThresholds)}
        parsed = {}
        for sid, raw in sites.items():
            _expect(isinstance(raw, dict), f"sites.{sid}", "an object", type(raw).__name__)
            unknown = sorted(set(raw) - fields)
            _expect(not unknown, f"sites.{sid}.{unknown[0] if unknown else ''}", "a known field", "unknown field")
            missing = [f for f in ("Hq", "Hkv", "threshold_lengths", "thresholds") if f not in raw]
            _expect(not missing, f"sites.{sid}.{missing[0] if missing else ''}", "present", "missing")
            parsed[sid] = SiteThresholds(**{k: _floats(v) if k in ("thresholds", "sdc_log_mass") else v for k, v in raw.items()})
        calibration = data.get("calibration", {})
        _expect(isinstance(calibration, dict), "calibration", "an object", type(calibration).__name__)
        return cls(model["fingerprint"], parsed, calibration).validate()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ThresholdTable":
        opener = gzip.open if os.fspath(path).endswith(".gz") else open  # big tables travel gzipped
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ThresholdsError(f"{os.fspath(path)}: no such file") from None
        except json.JSONDecodeError as e:
            raise ThresholdsError(f"{os.fspath(path)}: not JSON ({e.msg} at line {e.lineno})") from None
        except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
            raise ThresholdsError(f"{os.fspath(path)}: not a gzipped JSON table ({e})") from None
        try:
            return cls.from_json(data)
        except ThresholdsError as e:
            raise ThresholdsError(f"{os.fspath(path)}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)

    def check_fits(self, fingerprint: str, sites, same_weights: bool = False) -> None:
        """Raises ThresholdsError naming the first field that does not fit the model's sites.

        `same_weights`: the table was calibrated on another export of the same weights (float32
        vs float16, a torch export vs an onnxruntime-genai folder): the fingerprint and the dtype
        may differ; site ids (layer order) and head counts must still fit."""
        if not same_weights:
            _expect(self.fingerprint == fingerprint, "model.fingerprint", f"{fingerprint} (this model; "
                    "--same-weights applies a t.json of another export of the same weights)", self.fingerprint)
        by_id = {s.id: s for s in sites}
        for sid, t in self.sites.items():
            _expect(sid in by_id, f"sites.{sid}", f"one of this model's sites {sorted(by_id)[:3]}…", "no such site")
            site = by_id[sid]
            _expect(site.matched, f"sites.{sid}", "a matched site", f"a dense site ({site.reason})")
            _expect(t.Hq == site.Hq, f"sites.{sid}.Hq", site.Hq, t.Hq)
            _expect(t.Hkv == site.Hkv, f"sites.{sid}.Hkv", site.Hkv, t.Hkv)
            _expect(same_weights or t.dtype in (None, site.dtype), f"sites.{sid}.dtype", site.dtype, t.dtype)
        missing = [s.id for s in sites if s.matched and s.id not in self.sites]
        _expect(not missing, f"sites.{missing[0] if missing else ''}", "thresholds for every matched site", "missing")


def _expect(ok: bool, field: str, expected, found) -> None:
    if not ok:
        raise ThresholdsError(f"{field}: expected {expected}, got {found!r}")


def _floats(table):
    """JSON has no inf: t.json writes ±inf as the strings "inf"/"-inf" (or null for -inf)."""
    if not isinstance(table, list):
        return table
    conv = {"-inf": -math.inf, "inf": math.inf, "+inf": math.inf, None: -math.inf}
    return [[conv.get(x, x) if (x is None or isinstance(x, str)) else x for x in row] if isinstance(row, list) else row
            for row in table]


def _jsonable(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, list):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj
