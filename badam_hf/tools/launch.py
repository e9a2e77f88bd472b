"""Run an existing training script with `--optim badam` available, without editing it.

    python -m badam_hf.run train.py --optim badam --optim_args "switch_every=100" ...
    python -m badam_hf.run -m some.module --optim badam ...
    torchrun --nproc_per_node 1 -m badam_hf.run train.py ...
    accelerate launch -m badam_hf.run train.py ...

`--optim badam` exists once `badam_hf` is imported. A script that builds its arguments with
`HfArgumentParser` and trains with a plain `Trainer` (the examples shipped with transformers, a
vendored recipe, a script from a paper) cannot be given that import line when the user cannot or
should not edit it. This launcher imports `badam_hf`, then runs the script exactly as `python` would:
as `__main__`, with `sys.argv = [script, *args]` and the script's folder first on `sys.path`.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = (
    "usage: python -m badam_hf.run SCRIPT.py [ARGS...]\n"
    "       python -m badam_hf.run -m MODULE [ARGS...]\n"
    "Runs SCRIPT (or MODULE) as __main__ after `import badam_hf`, which makes `--optim badam` available."
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print(USAGE, file=stream)
        return 0 if stream is sys.stdout else 2

    import badam_hf  # noqa: F401  (registers --optim badam)

    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        sys.argv = [module, *args]  # run_module(alter_sys=True) replaces argv[0] by the module's file
        # Like `python -m`: the current directory comes first on the path.
        sys.path[0] = os.getcwd()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0

    script, args = argv[0], argv[1:]
    if not os.path.exists(script):
        print(f"badam_hf.run: no such file: {script!r}\n{USAGE}", file=sys.stderr)
        return 2
    sys.argv = [script, *args]
    # Like `python script.py`: the script's folder comes first on the path (replacing badam_hf.run's entry).
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
