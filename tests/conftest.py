"""Shared fixtures. tests/ holds helper modules (op_cases.py …) importable from every test folder."""
import pytest


@pytest.fixture(scope="session")
def topt_library() -> str:
    """The built custom-op library; a missing build is a failure, never a silent skip."""
    from topt_compile import get_library_path

    return get_library_path()


@pytest.fixture(scope="session")
def ort_session_factory(topt_library):
    import onnxruntime as ort

    def make(model, providers=("CPUExecutionProvider",)):
        options = ort.SessionOptions()
        options.register_custom_ops_library(topt_library)
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))

    return make
