"""The "one import line" usage: the same stock script, with `import badam_hf` added at the top."""

import badam_hf  # noqa: F401  (makes `--optim badam` available)

from train_clm import main

if __name__ == "__main__":
    main()
