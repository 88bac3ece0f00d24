"""topt's errors: one line each, naming where (file, node, field), what was expected, what was found."""
from __future__ import annotations


class ToptError(Exception):
    """Base class: the CLI prints `topt-compile: <message>` and exits with `exit_code`."""

    exit_code = 1


class ModelError(ToptError):
    """The input model cannot be read or is not a valid ONNX graph."""


class ThresholdsError(ToptError):
    """t.json is malformed or does not fit the model (field named in the message)."""

    exit_code = 2


class NoSitesError(ToptError):
    """No attention site was matched (pass allow_no_sites / --allow-no-sites to accept)."""

    exit_code = 3


class RewriteError(ToptError):
    """The rewritten graph failed validation (checker, shape inference)."""
