"""`python -m badam_hf.demo` (documented path; the demo lives in `badam_hf.tools.demo`)."""

import sys

from .tools.demo import main, run_demo

__all__ = ["main", "run_demo"]

if __name__ == "__main__":
    sys.exit(main())
