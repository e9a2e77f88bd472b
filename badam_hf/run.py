"""`python -m badam_hf.run SCRIPT.py ...` (documented path; the launcher lives in `badam_hf.tools.launch`)."""

import sys

from .tools.launch import USAGE, main

__all__ = ["USAGE", "main"]

if __name__ == "__main__":
    sys.exit(main())
