"""Where the compiled custom-op library (libtopt_ops.so, domain ai.topt) is, and how to load it."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

LIBRARY_NAME = "libtopt_ops.so"
ENV_VAR = "TOPT_LIBRARY_PATH"


def get_library_path() -> str:
    """The absolute path of libtopt_ops.so.

    Looked up in order: the environment variable TOPT_LIBRARY_PATH; next to this package; the
    installed distribution's files (a source checkout on sys.path, e.g. pytest run from the repo
    root, shadows the installed package, which still holds the library).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env}: no such file")
        return str(path.resolve())

    beside = Path(__file__).resolve().parent / LIBRARY_NAME
    if beside.is_file():
        return str(beside)

    try:
        distribution = importlib.metadata.distribution("topt")
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    for file in (distribution.files or []) if distribution else []:
        if file.name == LIBRARY_NAME:
            path = Path(distribution.locate_file(file)).resolve()
            if path.is_file():
                return str(path)

    raise FileNotFoundError(
        f"topt's custom-op library {LIBRARY_NAME} was not found next to {Path(__file__).parent} nor in "
        f"an installed 'topt' distribution: build and install it with `pip install .` from the "
        f"repository root, or set {ENV_VAR} to the library's path"
    )


def register(session_options) -> None:
    """Registers the ai.topt ops with an onnxruntime.SessionOptions."""
    session_options.register_custom_ops_library(get_library_path())
