"""scripts/bench_sft.py's core on the tiny model and a few chats: the data, the HF baseline's
inputs, both sides' figures, and that both sides train on the same objective (first-batch loss)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import load_script

bench = load_script("bench_sft")


def test_conversations_are_uneven_and_seeded():
    records = bench.conversations(12, seed=3)
    assert records == bench.conversations(12, seed=3)
    turns = {sum(m["role"] == "assistant" for m in r["messages"]) for r in records}
    assert turns <= {1, 2, 3, 4} and len(turns) > 1
    lengths = {len(m["content"].split()) for r in records for m in r["messages"] if m["role"] == "assistant"}
    assert max(lengths) > 3 * min(lengths)


def test_hf_inputs_pad_right_and_label_only_the_loss_mask():
    from agents.types import Trajectory

    def sample(prompt, response, mask):
        n = len(response)
        return Trajectory(prompt, response, mask, [0.0] * n, [0.0] * n, 0.0, 0, 0)

    batch = [sample([5, 6], [7, 8, 9], [1, 0, 1]), sample([5], [4], [1])]
    inputs = bench.hf_inputs(batch, pad_id=2)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 2, 2, 2]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert inputs["labels"].tolist() == [[-100, -100, 7, -100, 9], [-100, 4, -100, -100, -100]]
    assert bench.padding_fraction([batch]) == pytest.approx(1 - 7 / 10)


@pytest.fixture(scope="module")
def figures(tiny_model_dir, tmp_path_factory):
    data = bench.write_jsonl(
        bench.conversations(4, seed=1, user_words=12, assistant_words=30),
        tmp_path_factory.mktemp("chats") / "c.jsonl",
    )
    batches = bench.make_batches(bench.load_samples(data, tiny_model_dir), batch_size=2)
    threads = torch.get_num_threads()
    try:
        results = {
            "entrorl-packed": bench.run_entrorl(
                tiny_model_dir, batches, packing=True, micro_batch_tokens=256
            ),
            "hf": bench.run_hf(tiny_model_dir, batches, threads=1),
        }
    finally:
        torch.set_num_threads(threads)
    return bench.summarize(results, batches)


def test_both_sides_give_positive_figures(figures):
    for key in (
        "entrorl_tokens_per_s", "hf_tokens_per_s", "speedup", "entrorl_peak_rss_mib", "hf_peak_rss_mib", "samples",
    ):  # fmt: skip
        assert figures[key] > 0, (key, figures)
    assert figures["samples"] == 4
    assert 0 < figures["padding_fraction"] < 1


def test_hf_loss_is_entrorls_nll_on_the_first_batch(figures):
    # same initial weights, same batch: both are the token mean of -log p over its target tokens
    assert math.isfinite(figures["hf_first_loss"])
    assert figures["hf_first_loss"] == pytest.approx(figures["entrorl_first_loss"], abs=1e-4)
