"""topt_compile.generate.InPlaceDecoder: greedy generation with the KV cache bound in place."""
import numpy as np
import pytest

from genai_models import LAYERS, generate, genai_folder
from topt_compile.errors import ModelError
from topt_compile.frontends import genai
from topt_compile.generate import InPlaceDecoder, _DeviceArgmax

PROMPT = [5, 17, 33, 2, 9, 101, 250, 7, 64, 3, 12]


@pytest.fixture(scope="module")
def dense():
    return genai_folder("fp32", "cpu")


@pytest.fixture(scope="module")
def compiled(dense, tmp_path_factory):
    def get(theta):
        out = tmp_path_factory.mktemp("sparse") / f"theta{theta}"
        assert len(genai.compile_folder(dense, out, theta=theta, k=2).matched) == LAYERS
        return out
    return get


def test_greedy_equals_onnxruntime_genai_and_chunked_prefill_equals_one_prefill(dense):
    decoder = InPlaceDecoder(dense / "model.onnx", "cpu", batch=1, max_length=32, library=None)
    one, timing = decoder.greedy(np.asarray([PROMPT]), new_tokens=10)
    chunked, _ = decoder.greedy(np.asarray([PROMPT]), new_tokens=10, prefill_chunk=4)
    assert one.tolist() == chunked.tolist()
    assert one[0].tolist() == generate(dense, PROMPT, new_tokens=10)
    assert len(timing.step_s) == 9 and timing.median_step_s > 0


def test_compiled_folder_generates_the_dense_tokens_at_theta_minus_inf_in_a_batch(dense, compiled):
    prompts = np.asarray([PROMPT, PROMPT[::-1]])
    tokens = {}
    for name, folder, library in (("dense", dense, None), ("sparse", compiled(float("-inf")), "auto")):
        decoder = InPlaceDecoder(folder / "model.onnx", "cpu", batch=2, max_length=40, library=library)
        tokens[name], _ = decoder.greedy(prompts, new_tokens=12)
    assert tokens["dense"].tolist() == tokens["sparse"].tolist()
    sparse, _ = InPlaceDecoder(compiled(0.2) / "model.onnx", "cpu", 2, 40).greedy(prompts, 12)
    assert sparse.shape == (2, 12) and ((0 <= sparse) & (sparse < 300)).all()


def test_a_pruned_lm_head_folder_compiles_and_generates_the_dense_tokens(dense, tmp_path):
    # prune_lm_head (the builder's option for batches of long prompts: logits of the last position
    # only) changes the graph's tail, not its attention: the compiled folder still matches every layer.
    pruned = genai_folder("fp32", "cpu", {"prune_lm_head": "true"})
    assert InPlaceDecoder(pruned / "model.onnx", "cpu", 1, 8, library=None).session.get_outputs()[0].shape[1] == 1
    out = tmp_path / "sparse"
    assert len(genai.compile_folder(pruned, out, theta=float("-inf"), k=2).matched) == LAYERS
    prompts = np.asarray([PROMPT, PROMPT[::-1]])
    want, _ = InPlaceDecoder(dense / "model.onnx", "cpu", 2, 40, library=None).greedy(prompts, 12)
    for folder, library in ((pruned, None), (out, "auto")):
        got, _ = InPlaceDecoder(folder / "model.onnx", "cpu", 2, 40, library=library).greedy(prompts, 12)
        assert got.tolist() == want.tolist()


def test_tokens_picked_by_onnxruntime_are_numpys_argmax_of_the_last_position(dense):
    # greedy() picks tokens where the logits are (one ArgMax session: on the GPU with the CUDA EP;
    # the fp16 pick: the next test, and tests/cuda on the device)
    folder = dense
    prompts = np.asarray([PROMPT, PROMPT[::-1]])
    for static in (False, True):
        decoder = InPlaceDecoder(folder / "model.onnx", "cpu", 2, 40, library=None, static_inputs=static)
        token = prompts
        for _ in range(4):
            want = decoder.step(token).argmax(-1)
            decoder.position -= token.shape[1]  # the same call again: rows are rewritten in place
            got = decoder.next_tokens(token)
            assert got.dtype == np.int64 and got.tolist() == want.tolist()
            token = got[:, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_device_argmax_takes_the_first_of_tied_maxima_as_numpy(dtype):
    import onnxruntime as ort
    logits = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(dtype)
    logits[1, -1, [9, 40]] = 8   # a tie: the first index wins
    logits[2, 0, 3] = 50         # not the last position: ignored
    pick = _DeviceArgmax(ort, "tensor(float16)" if dtype == np.float16 else "tensor(float)", "cpu")
    got = pick(ort.OrtValue.ortvalue_from_numpy(logits))
    assert got.tolist() == logits[:, -1].argmax(-1).tolist() and got[1] == 9


def test_a_step_past_the_buffer_or_an_unknown_provider_is_a_one_line_error(dense):
    decoder = InPlaceDecoder(dense / "model.onnx", "cpu", batch=1, max_length=8, library=None)
    with pytest.raises(ModelError, match="input_ids: expected batch 1 and at most 8 more tokens"):
        decoder.step(np.zeros((1, 9), np.int64))
    with pytest.raises(ModelError, match="provider"):
        InPlaceDecoder(dense / "model.onnx", "tpu")


def test_static_inputs_for_cuda_graphs_generate_the_same_tokens(dense, compiled):
    # The CUDA-graph decode path (fixed buffers, [B, max_length] mask: total_sequence_length is the
    # buffer's length, seqlens_k the row's) must generate what the growing-mask path generates.
    prompts = np.asarray([PROMPT, PROMPT[::-1]])
    for folder, library in ((dense, None), (compiled(0.2), "auto")):
        grown, _ = InPlaceDecoder(folder / "model.onnx", "cpu", 2, 40, library=library).greedy(prompts, 12)
        static = InPlaceDecoder(folder / "model.onnx", "cpu", 2, 40, library=library, static_inputs=True)
        first, _ = static.greedy(prompts, 12)
        again, _ = static.greedy(prompts[:, :7], 12)  # a new prompt over the same buffers
        assert first.tolist() == grown.tolist()
        assert again.tolist() == InPlaceDecoder(folder / "model.onnx", "cpu", 2, 40, library=library).greedy(
            prompts[:, :7], 12)[0].tolist()


def test_cuda_graph_needs_the_cuda_provider(dense):
    with pytest.raises(ModelError, match="cuda_graph: needs provider 'cuda'"):
        InPlaceDecoder(dense / "model.onnx", "cpu", cuda_graph=True, library=None)
