"""Greedy generation in onnxruntime with the KV cache kept in place, as onnxruntime-genai runs it.

    from topt_compile.generate import InPlaceDecoder
    dec = InPlaceDecoder("sparse_folder/model.onnx", provider="cuda", batch=1, max_length=4096)
    tokens, timing = dec.greedy(prompt_ids, new_tokens=32)

For onnxruntime-genai folders (the model builder's GroupQueryAttention models, dense or compiled by
topt-compile): every past_key_values.N.key/value is one [B, Hkv, max_length, Dh] buffer on the
device, bound as both the past input and the present output (I/O binding), so a step writes only
its new rows and copies nothing (op.md, kv_layout `shared_buffer`). Greedy decoding picks each
token where the logits are (on the device with the CUDA EP), as onnxruntime-genai's greedy search
does: B token ids come back, not B·vocab logits (numpy takes ~5 ms to convert or scan 32 rows of 49152 fp16 logits, more than
the GPU work of a whole SmolLM2 step).
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
                 library: str | None = "auto", threads: int = 0, profile: bool = False, cuda_graph: bool = False,
                 static_inputs: bool = False):
        import onnxruntime as ort
        from . import get_library_path
        self.model = Path(model)
        if provider not in PROVIDERS:
            raise ModelError(f"provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ModelError(f"provider: {PROVIDERS[provider]} is not available in this onnxruntime "
                             f"({ort.get_available_providers()}): install onnxruntime-gpu")
        if cuda_graph and provider != "cuda":
            raise ModelError("cuda_graph: needs provider 'cuda'")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.enable_profiling = profile
        if library:
            options.register_custom_ops_library(get_library_path() if library == "auto" else library)
        ep = (PROVIDERS[provider], {"enable_cuda_graph": "1"}) if cuda_graph else PROVIDERS[provider]
        self.session = ort.InferenceSession(str(self.model), options, providers=[ep])
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
        self.graph = self._static_inputs(ort, inputs) if cuda_graph or static_inputs else None
        self.pick = _DeviceArgmax(ort, self.session.get_outputs()[0].type, provider)

    def _static_inputs(self, ort, inputs) -> dict:
        """Decode steps with every input and output at a fixed device address, updated in place, as
        ORT's CUDA graphs need (cuda_graph=True; static_inputs=True alone: the same without the
        graph). The attention mask is [B, max_length] with ones on the valid positions, as
        onnxruntime-genai's static buffers (seqlens_k = its sum − 1). Prompts run outside the graph
        (run option gpu_graph_id = -1)."""
        B, M = self.batch, self.max_length
        vocab = self.session.get_outputs()[0].shape[-1]
        if not isinstance(vocab, int):
            raise ModelError(f"{self.model}: static inputs need a static vocabulary size in the logits' shape")
        logits_type = np.float16 if "float16" in self.session.get_outputs()[0].type else np.float32
        g = {"ids": ort.OrtValue.ortvalue_from_numpy(np.zeros((B, 1), np.int64), self.device, 0),
             "mask_host": np.zeros((B, M), np.int64),
             "logits": ort.OrtValue.ortvalue_from_numpy(np.zeros((B, 1, vocab), logits_type), self.device, 0),
             "binding": self.session.io_binding(), "prompt_options": ort.RunOptions()}
        g["mask"] = ort.OrtValue.ortvalue_from_numpy(g["mask_host"], self.device, 0)
        g["prompt_options"].add_run_config_entry("gpu_graph_id", "-1")
        binding = g["binding"]
        binding.bind_ortvalue_output("logits", g["logits"])
        binding.bind_ortvalue_input("input_ids", g["ids"])
        binding.bind_ortvalue_input("attention_mask", g["mask"])
        for name, buf in zip(self.past, self.buffers):
            binding.bind_ortvalue_input(name, buf)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
        extra = set(inputs) - {"input_ids", "attention_mask", *self.past}
        if extra:
            raise ModelError(f"{self.model}: static inputs support input_ids, attention_mask and the cache; "
                             f"the model also takes {sorted(extra)}")
        return g

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
        if self.graph is not None and S == 1:
            return self._static_step(ids, logits)
        self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((B, self.position + S), np.int64))
        self.binding.bind_output("logits", self.device)  # unallocated again: its shape changes with S
        self.session.run_with_iobinding(self.binding, self.graph["prompt_options"] if self.graph else None)
        self.position += S
        if not logits:
            return None
        return self.binding.get_outputs()[0].numpy()[:, -1].astype(np.float32)

    def _static_step(self, ids: np.ndarray, logits: bool) -> np.ndarray | None:
        g = self.graph
        g["ids"].update_inplace(np.ascontiguousarray(ids, np.int64))
        g["mask_host"][:, :self.position + 1] = 1
        g["mask_host"][:, self.position + 1:] = 0
        g["mask"].update_inplace(g["mask_host"])
        self.session.run_with_iobinding(g["binding"])  # the first runs warm up and capture; then replays
        self.position += 1
        return g["logits"].numpy()[:, -1].astype(np.float32) if logits else None

    def next_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Runs ids [B, S] (as `step`) and returns the greedy next token of each row [B] (int64)."""
        self.step(ids, logits=False)
        logits = self.graph["logits"] if self.graph is not None and ids.shape[1] == 1 else self.binding.get_outputs()[0]
        return self.pick(logits)

    def greedy(self, prompt: np.ndarray, new_tokens: int, prefill_chunk: int | None = None) -> tuple[np.ndarray, Timing]:
        """Greedy continuation of prompt [B, L]: the prompt (in chunks of `prefill_chunk` tokens if
        given: a long prompt's logits are L·vocab; ORT's GroupQueryAttention takes chunks after a past
        only at batch 1), then one step per token. A step's time includes picking its tokens."""
        self.reset()
        t0 = time.perf_counter()
        chunk = prefill_chunk or prompt.shape[1]
        for start in range(0, prompt.shape[1] - chunk, chunk):
            self.step(prompt[:, start:start + chunk], logits=False)
        tokens, steps = [self.next_tokens(prompt[:, (prompt.shape[1] - 1) // chunk * chunk:])], []
        prefill = time.perf_counter() - t0
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            tokens.append(self.next_tokens(tokens[-1][:, None]))
            steps.append(time.perf_counter() - t0)
        return np.stack(tokens, 1), Timing(prefill, steps)

    def end_profiling(self) -> str:
        return self.session.end_profiling()


class _DeviceArgmax:
    """argmax over the vocabulary of the last position of logits [B, S, V] that stay on the device:
    a one-node onnxruntime session (Slice + ArgMax; first index on ties, as numpy)."""

    def __init__(self, ort, logits_type: str, provider: str):
        from onnx import TensorProto, helper
        elem = TensorProto.FLOAT16 if "float16" in logits_type else TensorProto.FLOAT
        graph = helper.make_graph(
            [helper.make_node("Slice", ["logits", "minus_one", "int_max", "one"], ["last"]),
             helper.make_node("ArgMax", ["last"], ["next"], axis=-1, keepdims=0)],
            "greedy_pick",
            [helper.make_tensor_value_info("logits", elem, ["B", "S", "V"])],
            [helper.make_tensor_value_info("next", TensorProto.INT64, ["B", 1])],
            [helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("int_max", TensorProto.INT64, [1], [2 ** 62]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])])
        # IR 8 (opset 17): any onnxruntime since 1.11 loads it, whatever onnx made this
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDERS[provider]])
        self.binding = self.session.io_binding()

    def __call__(self, logits) -> np.ndarray:
        self.binding.bind_ortvalue_input("logits", logits)
        self.binding.bind_output("next", "cpu")
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()[:, 0]
