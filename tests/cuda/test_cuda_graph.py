"""Decode under onnxruntime's CUDA graphs (enable_cuda_graph), as onnxruntime-genai runs it with
static buffers: a compiled folder captures and replays like the dense one, and the replayed steps
generate what plain steps generate — across new prompts in the same buffers, whose prompt calls
(outside the graph) must not move the scratch the captured decode kernels use."""
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "genai"))
from genai_models import genai_folder  # noqa: E402

from topt_compile.frontends import genai  # noqa: E402
from topt_compile.generate import InPlaceDecoder  # noqa: E402

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider here (CPU-only build or no GPU)")

PROMPTS = np.asarray([[5, 17, 33, 2, 9, 101, 250, 7, 64, 3, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48],
                      [12, 3, 64, 7, 250, 101, 9, 2, 33, 17, 5, 90, 91, 92, 93, 94, 95, 96, 97, 98]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    dense = genai_folder("fp16", "cuda")
    sparse = tmp_path_factory.mktemp("graph") / "sparse"
    genai.compile_folder(dense, sparse, theta=0.05, k=4)
    return {"dense": (dense, None), "sparse": (sparse, "auto")}


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_graph_replay_generates_the_plain_steps_tokens(folders, topt_library, name):
    folder, library = folders[name]
    library = topt_library if library else None
    plain = InPlaceDecoder(folder / "model.onnx", "cuda", 2, 96, library=library)
    graph = InPlaceDecoder(folder / "model.onnx", "cuda", 2, 96, library=library, cuda_graph=True)
    for prompt in (PROMPTS, PROMPTS[:, :7], PROMPTS[::-1, :16], PROMPTS):  # steps 3+ replay the graph
        want, _ = plain.greedy(prompt, 24)
        got, _ = graph.greedy(prompt, 24)
        assert got.tolist() == want.tolist(), f"{name}, prompt length {prompt.shape[1]}"


def test_the_compiled_model_needs_no_copy_to_the_device(folders, topt_library, tmp_path):
    # total_sequence_length is a host input of the op, as of GroupQueryAttention: no Memcpy node,
    # which would also keep onnxruntime from capturing the graph
    import onnx
    folder, _ = folders["sparse"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(topt_library)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CUDAExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    assert "TopThetaGroupQueryAttention" in ops
    assert not [op for op in ops if op.startswith("Memcpy")], ops


@pytest.mark.parametrize("graph", [False, True])
def test_tokens_picked_on_the_device_are_numpys_argmax_of_the_fp16_logits(folders, topt_library, graph):
    folder, _ = folders["sparse"]
    decoder = InPlaceDecoder(folder / "model.onnx", "cuda", 2, 96, library=topt_library, cuda_graph=graph)
    token = PROMPTS
    for _ in range(6):  # steps 3+ replay the graph
        want = decoder.step(token).argmax(-1)
        decoder.position -= token.shape[1]  # the same call again: its rows are rewritten in place
        got = decoder.next_tokens(token)
        assert got.tolist() == want.tolist()
        token = got[:, None]
