"""topt-compile as an Olive pass (olive-ai ≥ 0.13: `pip install "topt[olive]"`).

A workflow names the pass `TopThetaCompile`; Olive finds passes through its package config, so
give it one that includes this pass:

    olive run --config workflow.json --package-config topt_olive_config.json
    # topt_olive_config.json: python -m topt_compile.olive_pass topt_olive_config.json
    # (Olive's own olive_config.json plus {"TopThetaCompile": {"module_path":
    #  "topt_compile.olive_pass.TopThetaCompile", ...}})

    olive.workflows.run(workflow, package_config=topt_compile.olive_pass.package_config())

workflow.json's pass entry, e.g.
`"passes": {"sparsify": {"type": "TopThetaCompile", "thresholds": "t.json"}}` or with a uniform
`"theta": -1e30, "k": 0, "placement": "post_softmax", "compensation": "vmc"` (JSON has no -inf;
-1e30 keeps every key as -inf does; the string "-inf" is accepted too).

Olive's own ONNX Runtime sessions (its evaluators, session tuning) register only
onnxruntime-extensions, not the topt library: evaluate the compiled model with topt-compare or
topt-eval instead of an Olive evaluator.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from olive.common.config_utils import ParamCategory
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam
from olive.resource_path import LocalFile, LocalFolder

from .compile import CompileOptions, compile_model
from .ops.schema import PLACEMENTS

PASS_NAME = "TopThetaCompile"
MODULE_CONFIG = {"module_path": f"topt_compile.olive_pass.{PASS_NAME}", "supported_providers": ["*"],
                 "supported_accelerators": ["*"], "supported_precisions": ["*"]}


class TopThetaCompile(Pass):
    """Replaces the attention of an ONNX model with ai.topt::TopThetaAttention (compile.compile_model)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "thresholds": PassConfigParam(type_=str, category=ParamCategory.PATH,
                                          description="t.json from topt-calibrate (or give theta)"),
            "theta": PassConfigParam(type_=float, description="one θ for every head and length instead of a t.json "
                                     "(-inf or -1e30: dense-equivalent, for checking)"),
            "k": PassConfigParam(type_=int, default_value=0,
                                 description="with theta: rows with at most k keys stay dense"),
            "placement": PassConfigParam(type_=str, default_value="post_softmax",
                                         description=f"with theta: one of {', '.join(PLACEMENTS)}"),
            "compensation": PassConfigParam(type_=str, default_value="vmc", description="with theta: none or "
                                            "+-joined vmc, sdc_exact, sdc_exp_threshold"),
            "allow_no_sites": PassConfigParam(type_=bool, default_value=False,
                                              description="write the model even if no attention site matched"),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        options = CompileOptions(thresholds=config.thresholds, theta=config.theta, k=config.k,
                                 placement=config.placement, compensation=config.compensation,
                                 allow_no_sites=config.allow_no_sites)
        compile_model(model.model_path, output, options)  # ToptError: one line naming the file and field
        external = (output.parent / f"{output.name}.data").exists()  # models over 2 GB: weights beside it
        path = LocalFolder({"path": output.parent}) if external else LocalFile({"path": output})
        return ONNXModelHandler(model_path=path, onnx_file_name=output.name if external else None,
                                inference_settings=model.inference_settings, model_attributes=model.model_attributes)


def package_config() -> dict:
    """Olive's default package config with this pass added (what `package_config=` / --package-config take)."""
    from olive.package_config import OlivePackageConfig
    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config["passes"][PASS_NAME] = MODULE_CONFIG
    return config


if __name__ == "__main__":  # python -m topt_compile.olive_pass topt_olive_config.json
    if len(sys.argv) != 2:
        sys.exit("usage: python -m topt_compile.olive_pass OUTPUT.json  "
                 "(writes Olive's package config plus TopThetaCompile)")
    Path(sys.argv[1]).write_text(json.dumps(package_config(), indent=1))
    print(f"wrote {sys.argv[1]}: olive run --config workflow.json --package-config {sys.argv[1]}")
