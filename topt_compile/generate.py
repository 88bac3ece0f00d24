"""Greedy generation in onnxruntime with the KV cache kept in place, as onnxruntime-genai runs it.

    from topt_compile.generate import InPlaceDecoder
    dec = InPlaceDecoder("sparse_folder/model.onnx", provider="cuda", batch=1, max_length=4096)
    tokens, timing = dec.greedy(prompt_ids, new_tokens=32)

For onnxruntime-genai folders (the model builder's GroupQueryAttention models, dense or compiled by
topt-compile): every past_key_values.N.key/value is one [B, Hkv, max_length, Dh] buffer on the
device, bound as both the past input and the present output (I/O binding), so a step writes only
its new rows and copies nothing (op.md, kv_layout `shared_buffer`). Only the last position's
logits come back to the host.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .errors import ModelError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclasses.dataclass
class Timing:
    prefill_s: float
    step_s: list[float]              # wall time of each decode step (the step is synchronous)

    @property
    def median_step_s(self) -> float:
        return float(np.median(self.step_s)) if self.step_s else float("nan")


class InPlaceDecoder:
    """One onnxruntime session of a genai decoder model with in-place KV buffers (batch × max_length)."""

    def __init__(self, model: str | Path, provider: str = "cpu", batch: int = 1, max_length: int = 2048,
                 library: str | None = "auto", threads: int = 0, profile: bool = False):
        import onnxruntime as ort
        from . import get_library_path
        self.model = Path(model)
        if provider not in PROVIDERS:
            raise ModelError(f"provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ModelError(f"provider: {PROVIDERS[provider]} is not available in this onnxruntime "
                             f"({ort.get_available_providers()}): install onnxruntime-gpu")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.enable_profiling = profile
        if library:
            options.register_custom_ops_library(get_library_path() if library == "auto" else library)
        self.session = ort.InferenceSession(str(self.model), options, providers=[PROVIDERS[provider]])
        self.device = "cuda" if provider == "cuda" else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted((n for n in inputs if n.startswith("past_key_values.")),
                           key=lambda n: (int(n.split(".")[1]), n))
        if not self.past or "attention_mask" not in inputs:
            raise ModelError(f"{self.model}: expected a decoder with input_ids, attention_mask and "
                             f"past_key_values.N.key/value inputs (an onnxruntime-genai model)")
        heads, head_size = self._kv_shape(inputs)
        dtype = np.float16 if "float16" in inputs[self.past[0]].type else np.float32
        self.batch, self.max_length, self.dtype = batch, max_length, dtype
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits", self.device)  # bound first: get_outputs()[0]
        self.buffers = []
        for name in self.past:  # one buffer per past/present pair: the in-place cache
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, max_length, head_size), dtype), self.device, 0)
            self.buffers.append(buf)
            self.binding.bind_ortvalue_input(name, buf)
            self.binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
        self.position = 0

    def _kv_shape(self, inputs) -> tuple[int, int]:
        shape = inputs[self.past[0]].shape
        if isinstance(shape[1], int) and isinstance(shape[3], int):
            return shape[1], shape[3]
        config = self.model.parent / "genai_config.json"
        if config.is_file():
            decoder = json.loads(config.read_text())["model"]["decoder"]
            return decoder["num_key_value_heads"], decoder["head_size"]
        raise ModelError(f"{self.model}: the KV heads and head size are symbolic and there is no genai_config.json")

    def reset(self) -> None:
        self.position = 0  # the buffers' old rows are never read: each row is rewritten before it is visible

    def step(self, ids: np.ndarray, logits: bool = True) -> np.ndarray | None:
        """Runs ids [B, S] after the cached positions; returns the last position's logits [B, V] (float32)."""
        B, S = ids.shape
        if B != self.batch or self.position + S > self.max_length:
            raise ModelError(f"input_ids: expected batch {self.batch} and at most {self.max_length - self.position} "
                             f"more tokens, got {ids.shape}")
        self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((B, self.position + S), np.int64))
        self.binding.bind_output("logits", self.device)  # unallocated again: its shape changes with S
        self.session.run_with_iobinding(self.binding)
        self.position += S
        if not logits:
            return None
        return self.binding.get_outputs()[0].numpy()[:, -1].astype(np.float32)

    def greedy(self, prompt: np.ndarray, new_tokens: int, prefill_chunk: int | None = None) -> tuple[np.ndarray, Timing]:
        """Greedy continuation of prompt [B, L]: the prompt (in chunks of `prefill_chunk` tokens if
        given: a long prompt's logits are L·vocab; ORT's GroupQueryAttention takes chunks after a past
        only at batch 1), then one step per token."""
        self.reset()
        t0 = time.perf_counter()
        chunk = prefill_chunk or prompt.shape[1]
        for start in range(0, prompt.shape[1], chunk):
            logits = self.step(prompt[:, start:start + chunk], logits=start + chunk >= prompt.shape[1])
        prefill = time.perf_counter() - t0
        tokens, steps = [logits.argmax(-1)], []
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            logits = self.step(tokens[-1][:, None])
            steps.append(time.perf_counter() - t0)
            tokens.append(logits.argmax(-1))
        return np.stack(tokens, 1), Timing(prefill, steps)

    def end_profiling(self) -> str:
        return self.session.end_profiling()
