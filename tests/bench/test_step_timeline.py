"""bench/step_timeline.py's grouping of a step's kernels into attention sites (no GPU needed)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def timeline():
    spec = importlib.util.spec_from_file_location("step_timeline", ROOT / "bench" / "step_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_site_is_its_attention_kernels_and_one_short_helper_between_them(timeline):
    def layer(t0, split):  # a GEMM, the site (front, a short fill, split, merge overlapping it), a GEMM
        return [(t0, t0 + 4, "nvjet_gemm"), (t0 + 4.5, t0 + 6.5, "void topt::GqaPrepKernel<__half>(p)"),
                (t0 + 6.7, t0 + 7.5, "void onnxruntime::cuda::_Fill<int, 256, 4>(int*)"),
                (t0 + 8, t0 + 8 + split, "void topt::cuda_detail::(anonymous namespace)::DecodeSplitKernel<__half>(p)"),
                (t0 + 6 + split, t0 + 14 + split, "void topt::DecodeMergeKernel<__half>(p)"),
                (t0 + 14.5 + split, t0 + 18 + split, "nvjet_gemm")]
    spans = layer(0, 40) + layer(100, 50) + layer(200, 60)
    got = timeline.site_timeline(sorted(spans))
    assert got["sites"] == 3
    assert got["site span"] == pytest.approx(9.5 + 50)  # front start to merge end, median layer
    assert got["DecodeSplitKernel: duration"] == 50 and got["DecodeSplitKernel: start in site"] == 3.5
    assert got["GqaPrepKernel: duration"] == 2 and got["_Fill: duration"] == pytest.approx(0.8)
    assert got["gap from the kernel before"] == 0.5 and got["gap to the kernel after"] == 0.5


def test_a_long_kernel_between_attention_kernels_ends_the_site(timeline):
    spans = [(0, 4, "nvjet_gemm"), (5, 8, "UnpackRoPEAppend<__half>"), (8, 20, "reduce_sum_kernel"),
             (21, 60, "cudnn_sdpa_flash_fprop"), (61, 64, "nvjet_gemm")]
    got = timeline.site_timeline(spans)
    assert got["sites"] == 2 and "reduce_sum_kernel: duration" not in got
