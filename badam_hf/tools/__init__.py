"""Commands: `badam-hf` (`cli`), the memory estimator (`estimate`), the embedded demo (`demo`) and the
launcher for unmodified scripts (`launch`). May import every other package of badam_hf."""
