"""`topt-eval`: argument parsing and the work are in eval.py (`python -m topt_compile.eval` is the same)."""
from __future__ import annotations

import sys

from .eval import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
