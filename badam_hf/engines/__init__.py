"""Engines that BAdam plugs into: DDP (`ddp`), FSDP2 (`fsdp2`), DeepSpeed ZeRO-3 (`deepspeed`), what they
share (`common`), and which one applies (`dispatch`). May import `badam_hf.core`, never `integrations`."""
