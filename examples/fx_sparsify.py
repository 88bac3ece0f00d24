"""Sparsify a Hugging Face model in PyTorch, calibrate its thresholds, export it to ONNX, run it.

A tiny LLaMA with random weights (no hub access needed): calibrate Top-θ thresholds in torch on a
few random prompts, write t.json, sparsify the model with it, export with torch.onnx (the sites
become ai.topt::TopThetaAttention nodes), and run the file in onnxruntime with the topt library.
Usage: python examples/fx_sparsify.py [out_dir]
"""
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers as tf

import topt_compile
from topt_compile.frontends import fx
from topt_compile.thresholds.calibrate_torch import calibrate

out = Path(sys.argv[1] if len(sys.argv) > 1 else "fx_sparsify_out")
out.mkdir(exist_ok=True)
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()

print(fx.list_sites(model).to_text())
prompts = [{"input_ids": torch.randint(0, 128, (2, 48)), "use_cache": False} for _ in range(4)]
table = calibrate(model, prompts, k=8, first_layers_k=16, length_step=8, dataset="random tokens")
table.save(out / "t.json")

sparse, report = fx.sparsify(model, thresholds=out / "t.json")
ids = torch.randint(0, 128, (1, 40))
with torch.no_grad():
    logits = sparse(input_ids=ids, use_cache=False).logits


class Logits(torch.nn.Module):  # a plain-tensor signature for the export
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


seq = torch.export.Dim("S", min=2, max=256)
torch.onnx.export(Logits(sparse).eval(), (ids,), dynamo=True, input_names=["input_ids"], output_names=["logits"],
                  dynamic_shapes={"input_ids": {1: seq}}).save(str(out / "model.onnx"))

options = ort.SessionOptions()
options.register_custom_ops_library(topt_compile.get_library_path())
session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
(ort_logits,) = session.run(None, {"input_ids": ids.numpy()})
print(f"wrote {out / 't.json'} and {out / 'model.onnx'}")
print(f"max |onnxruntime - torch| on the logits: {np.abs(ort_logits - logits.numpy()).max():.2e}")
