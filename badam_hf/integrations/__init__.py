"""Hugging Face glue: `BAdamTrainer` / `make_badam_trainer` / `BAdamCallback` (`trainer`) and every patch of
transformers and accelerate (`patches`: `--optim badam`, FSDP2 optimizer checkpoints, DeepSpeed resume).
May import `badam_hf.core` and `badam_hf.engines`."""
