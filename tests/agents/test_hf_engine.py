"""HFEngine (agents/engines/hf.py) with a tiny random Llama over SmolLM2's vocabulary.

Every statistic the engine returns is checked against one plain forward pass over prompt +
generated ids: that is what the learner will compute, so the two must agree.

Run: .venv/bin/python -m pytest tests/agents/test_hf_engine.py -q
"""

import pytest
import torch

from agents.engines.base import SamplingParams
from agents.engines.hf import HFEngine
from tests.conftest import build_tiny_llama

PROMPTS = ["Hello there, how are you today?", "Hi", "The quick brown fox jumps over the lazy dog. It"]


def sharpen(model):
    """A fresh random model is nearly uniform (entropy ~ ln V), so greedy repeats one token and a
    padding bug would move logprobs only in the 6th digit. Scaling the weights makes the next
    token depend on the context and the distribution peaked enough to show such bugs."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = HFEngine.from_pretrained(str(tiny_model_dir))
    sharpen(engine.model)
    return engine


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer(text)["input_ids"] for text in PROMPTS]


def reference(model, prompt, generated, temperature=1.0):
    """log_softmax and entropy at each generated position, from one full forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    token_logp = logp.gather(-1, torch.tensor(generated)[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy, logits


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_a_full_forward(engine, prompts, temperature):
    results = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=6, seed=0))
    for prompt, result in zip(prompts, results, strict=True):
        assert len(result.token_ids) == len(result.logprobs) == len(result.entropies) == 6
        token_logp, entropy, _ = reference(engine.model, prompt, result.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(result.logprobs), token_logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(result.entropies), entropy, atol=1e-4, rtol=0)
        assert result.entropy_is_exact and result.finish_reason == "length"
    # premise: the distributions are far from uniform, so agreement is not trivial
    assert max(h for r in results for h in r.entropies) < 0.9 * torch.log(torch.tensor(len(engine.tokenizer)))


def test_greedy_is_deterministic_argmax(engine, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    first, second = engine.generate(prompts, greedy), engine.generate(prompts, greedy)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    for prompt, result in zip(prompts, first, strict=True):
        token_logp, entropy, logits = reference(engine.model, prompt, result.token_ids)
        assert result.token_ids == logits.argmax(-1).tolist()
        # greedy reports the statistics of the untempered distribution
        torch.testing.assert_close(torch.tensor(result.logprobs), token_logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(result.entropies), entropy, atol=1e-4, rtol=0)
    assert len({tuple(r.token_ids) for r in first}) == 3  # the prompts lead to different replies


def test_left_padding_matches_one_at_a_time(engine, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert len({len(p) for p in prompts}) == 3  # premise: the batch needs padding
    batched = engine.generate(prompts, greedy)
    for prompt, together in zip(prompts, batched, strict=True):
        (alone,) = engine.generate([prompt], greedy)
        assert together.token_ids == alone.token_ids
        torch.testing.assert_close(
            torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(together.entropies), torch.tensor(alone.entropies), atol=1e-4, rtol=0
        )


def test_repeated_prompts_sample_independently(engine, prompts):
    """A group repeats one prompt: each copy must be its own sample with exact statistics."""
    group = [prompts[0], prompts[1], prompts[0], prompts[0]]
    results = engine.generate(group, SamplingParams(temperature=1.0, max_new_tokens=6, seed=3))
    for prompt, result in zip(group, results, strict=True):
        token_logp, entropy, _ = reference(engine.model, prompt, result.token_ids)
        torch.testing.assert_close(torch.tensor(result.logprobs), token_logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(result.entropies), entropy, atol=1e-4, rtol=0)
    assert len({tuple(results[i].token_ids) for i in (0, 2, 3)}) == 3
    greedy = engine.generate(group, SamplingParams(temperature=0.0, max_new_tokens=6))
    (alone,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=6))
    assert greedy[0].token_ids == greedy[2].token_ids == greedy[3].token_ids == alone.token_ids


def test_seed_makes_sampling_reproducible(engine, prompts):
    def ids(seed):
        return [
            r.token_ids
            for r in engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=seed))
        ]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)


def test_top_k_samples_inside_the_top_k_and_renormalises(engine, prompts):
    (result,) = engine.generate(
        prompts[:1], SamplingParams(temperature=1.0, top_k=3, max_new_tokens=6, seed=0)
    )
    _, _, logits = reference(engine.model, prompts[0], result.token_ids)
    top = logits.topk(3, dim=-1)
    for t, token in enumerate(result.token_ids):
        assert token in top.indices[t].tolist()
        logp_top = torch.log_softmax(top.values[t], dim=-1)  # the distribution it was drawn from
        expected = logp_top[top.indices[t].tolist().index(token)]
        assert result.logprobs[t] == pytest.approx(float(expected), abs=1e-4)
        assert result.entropies[t] == pytest.approx(float(-(logp_top.exp() * logp_top).sum()), abs=1e-4)


def test_top_p_samples_inside_the_nucleus(engine, prompts):
    (result,) = engine.generate(
        prompts[2:], SamplingParams(temperature=1.0, top_p=0.6, max_new_tokens=6, seed=0)
    )
    _, _, logits = reference(engine.model, prompts[2], result.token_ids)
    for t, token in enumerate(result.token_ids):
        probs, order = logits[t].softmax(-1).sort(descending=True)
        # the nucleus: the most likely tokens up to and including the one whose mass reaches 0.6
        size = int((probs.cumsum(-1) < 0.6).sum()) + 1
        nucleus = order[:size].tolist()
        assert token in nucleus
        logp = torch.log_softmax(logits[t, nucleus], dim=-1)
        assert result.logprobs[t] == pytest.approx(float(logp[nucleus.index(token)]), abs=1e-4)
        assert result.entropies[t] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)


def test_max_new_tokens_gives_length(engine, prompts):
    results = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))
    assert [(len(r.token_ids), r.finish_reason) for r in results] == [(3, "length")] * 3


def test_stop_string_ends_only_its_row(engine, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    free = engine.generate(prompts, greedy)
    # stop row 0 at its 3rd token: the text of that token, which the first two do not contain
    third = engine.tokenizer.decode(free[0].token_ids[2:3])
    assert third.strip() and third not in engine.tokenizer.decode(free[0].token_ids[:2])
    others = [engine.tokenizer.decode(r.token_ids) for r in free[1:]]
    assert not any(third in text for text in others)  # premise: only row 0 meets the stop string
    stopped = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, stop=[third]))
    assert stopped[0].token_ids == free[0].token_ids[:3] and stopped[0].finish_reason == "stop"
    assert stopped[0].logprobs == pytest.approx(free[0].logprobs[:3], abs=1e-5)
    for before, after in zip(free[1:], stopped[1:], strict=True):  # the rows that go on are unaffected
        assert after.token_ids == before.token_ids and after.finish_reason == "length"


def test_eos_ends_the_row_and_is_kept(engine, prompts, monkeypatch):
    (free,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=6))
    monkeypatch.setattr(engine, "eos_ids", {free.token_ids[1]})  # pretend the 2nd token is EOS
    (ended,) = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=6))
    assert ended.token_ids == free.token_ids[:2] and ended.finish_reason == "stop"


def test_eos_ids_come_from_model_and_tokenizer(engine):
    assert engine.eos_ids == {engine.tokenizer.eos_token_id}
    assert engine.pad_id == engine.tokenizer.pad_token_id


def test_empty_request_list(engine):
    assert engine.generate([], SamplingParams()) == []


def test_load_weights_replaces_the_policy(tiny_model_dir, prompts):
    engine = HFEngine.from_pretrained(str(tiny_model_dir))  # its own copy: this test overwrites it
    sharpen(engine.model)
    other = sharpen(build_tiny_llama(len(engine.tokenizer), seed=1))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = engine.generate(prompts, greedy)
    engine.load_weights(other.named_parameters())
    after = engine.generate(prompts, greedy)
    expected = HFEngine(other, engine.tokenizer).generate(prompts, greedy)
    assert [r.token_ids for r in after] != [r.token_ids for r in before]
    for got, want in zip(after, expected, strict=True):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.load_weights([("nope", torch.zeros(1))])


# -- prefix cache ------------------------------------------------------------------------------


@pytest.fixture
def uncached(engine):
    return HFEngine(engine.model, engine.tokenizer, prefix_cache_bytes=0)


def assert_same_results(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(a.entropies), torch.tensor(b.entropies), atol=1e-4, rtol=0)


def test_next_turn_prefills_only_past_the_cached_reply(engine, uncached, prompts):
    """Turn 2's prompt is turn 1's prompt + reply + an observation: only the tail past the fed
    reply tokens (all but the last) is run, and the results equal a cold engine's."""
    engine.reset_prefix_cache()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    first = engine.generate(prompts, greedy)
    observation = engine.tokenizer(" You see a key.")["input_ids"]
    second_turn = [p + r.token_ids + observation for p, r in zip(prompts, first, strict=True)]
    engine.take_stats()
    assert_same_results(engine.generate(second_turn, greedy), uncached.generate(second_turn, greedy))
    stats = engine.take_stats()
    assert stats["engine/prompt_tokens"] == sum(len(p) for p in second_turn)
    assert stats["engine/cached_prompt_tokens"] == sum(len(p) + len(r.token_ids) - 1 for p, r in zip(prompts, first, strict=True))


def test_mixed_hits_share_one_batch(engine, uncached, prompts):
    """Rows with a full hit, a partial hit (a fork: the parent's prompt cut mid-way, then other
    tokens), a repeated prompt and no hit at all, in one sampled batch with exact statistics."""
    engine.reset_prefix_cache()
    engine.generate(prompts[2:], SamplingParams(temperature=0.0, max_new_tokens=4))
    fork = prompts[2][:6] + engine.tokenizer(" cat sat")["input_ids"]
    extended = prompts[2] + engine.tokenizer(" And then")["input_ids"]
    batch = [extended, fork, prompts[0], extended, prompts[1]]
    engine.take_stats()
    results = engine.generate(batch, SamplingParams(temperature=1.0, max_new_tokens=6, seed=5))
    for prompt, result in zip(batch, results, strict=True):
        token_logp, entropy, _ = reference(engine.model, prompt, result.token_ids)
        torch.testing.assert_close(torch.tensor(result.logprobs), token_logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(result.entropies), entropy, atol=1e-4, rtol=0)
    # `extended` reuses all of prompts[2] (then parts from the cached reply) once, its repeat
    # being deduplicated; `fork` reuses its first 6 tokens
    assert engine.take_stats()["engine/cached_prompt_tokens"] == len(prompts[2]) + 6
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    assert_same_results(engine.generate(batch, greedy), uncached.generate(batch, greedy))


def test_load_weights_empties_the_prefix_cache(tiny_model_dir, prompts):
    engine = HFEngine.from_pretrained(str(tiny_model_dir))
    engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=3))
    assert len(engine.prefix_cache) == 3
    engine.load_weights(build_tiny_llama(len(engine.tokenizer), seed=1).named_parameters())
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.nbytes == 0


def test_generating_twice_warns_about_no_deprecated_cache_name(engine, prompts):
    """transformers 5.x renamed `past_key_values` to `cache` (a FutureWarning per call and a
    logged deprecation); the engine passes and reads the cache under the name the installed
    version wants, so a training run prints neither, on any step."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging.warning_once, "cache_clear"):
        hf_logging.warning_once.cache_clear()  # logged once per process: let this test see it
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))
    finally:
        hf_logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "past_key_values" in m or "cache_params" in m], messages


def test_a_model_that_takes_the_old_cache_name_gets_it(engine, prompts):
    """transformers before the rename (the GPU machines' version): forward takes
    `past_key_values` and its output declares that field. A stand-in with that interface over
    the same model samples exactly what the engine samples, the prefix cache's prefill included."""
    from dataclasses import dataclass

    from transformers.modeling_outputs import ModelOutput

    @dataclass
    class OldOutput(ModelOutput):
        logits: torch.Tensor | None = None
        past_key_values: object = None

    class OldNames(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.generation_config = inner.generation_config

        def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True,
                    logits_to_keep=0):  # fmt: skip
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)  # fmt: skip
            return OldOutput(logits=out.logits, past_key_values=out.cache)

    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    old = HFEngine(OldNames(engine.model), engine.tokenizer)
    new = HFEngine(engine.model, engine.tokenizer)
    assert old._cache_kwarg == "past_key_values" and new._cache_kwarg == "cache"
    for _ in range(2):  # the second call prefills from the prefix cache
        assert_same_results(old.generate(prompts, greedy), new.generate(prompts, greedy))
    assert old.take_stats()["engine/cached_prompt_tokens"] > 0
