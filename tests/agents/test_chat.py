"""Token-exact appends (agents/chat.py) on SmolLM2's real chat template.

The rule (DESIGN.md, "The token-exact rule"): a conversation grows by appends only, and the
appends must equal what a full render of the same conversation would tokenize to.

Run: .venv/bin/python -m pytest tests/agents/test_chat.py -q
"""

import pytest

from agents.chat import delta_ids, encode, render_prompt

SYSTEM = {"role": "system", "content": "You are playing a text adventure game."}
USER_1 = {
    "role": "user",
    "content": "-= Kitchen =-\nValid commands:\n1. look\n2. go east\n\nWhich command number?",
}
USER_2 = {"role": "user", "content": "You go east.\n\n-= Hall =-\nValid commands:\n1. look\n2. go west"}
USER_3 = {"role": "user", "content": "You see nothing special."}


def full_render(tokenizer, turns, prefill):
    """Render the whole conversation at once: system, user, then (reply, next user) pairs."""
    messages = [SYSTEM, USER_1]
    for reply, user in turns:
        messages += [{"role": "assistant", "content": prefill + reply}, user]
    return render_prompt(tokenizer, messages, prefill)


def sampled(tokenizer, reply, ended):
    """What an engine would have sampled for `reply`: its ids, plus EOS if the turn ended."""
    return encode(tokenizer, reply) + ([tokenizer.eos_token_id] if ended else [])


@pytest.mark.parametrize("prefill", ["", "<action>"])
@pytest.mark.parametrize("ended", [True, False], ids=["eos", "cut"])
@pytest.mark.parametrize("reply", ["2</action>", "go east</action>", " I think 2", "2\n\n"])
def test_append_equals_full_render(smol_tokenizer, reply, ended, prefill):
    tok = smol_tokenizer
    prompt = render_prompt(tok, [SYSTEM, USER_1], prefill)
    reply_ids = sampled(tok, reply, ended)
    delta = delta_ids(tok, [SYSTEM, USER_1], USER_2, reply_ended=ended, prefill=prefill)
    assert prompt + reply_ids + delta == full_render(tok, [(reply, USER_2)], prefill)


@pytest.mark.parametrize("ended", [True, False], ids=["eos", "cut"])
def test_boundary_is_a_special_token(smol_tokenizer, ended):
    """The seam between sampled ids and the delta is a special token, so the separately
    tokenized delta cannot merge with what the model sampled: a cut reply gets the EOS from the
    delta, an ended one already has it."""
    tok = smol_tokenizer
    reply_ids = sampled(tok, "2</action>", ended)
    delta = delta_ids(tok, [SYSTEM, USER_1], USER_2, reply_ended=ended, prefill="<action>")
    seam = delta[0] if not ended else reply_ids[-1]
    assert seam == tok.eos_token_id and tok.convert_ids_to_tokens(seam) in tok.all_special_tokens
    # exactly one end-of-turn token between the reply text and the next user message
    assert (reply_ids + delta).count(tok.eos_token_id) == 2  # the reply's and the user message's
    assert delta[-len(encode(tok, "<action>")) :] == encode(tok, "<action>")


def test_three_turns_by_appends_only(smol_tokenizer):
    """Two replies (one ended, one cut) appended turn by turn equal the full render; the
    history passed to delta_ids only needs the roles (the rollout passes empty replies)."""
    tok, prefill = smol_tokenizer, "<action>"
    ids = render_prompt(tok, [SYSTEM, USER_1], prefill)
    history = [SYSTEM, USER_1]
    for reply, ended, user in [("2</action>", True, USER_2), ("look", False, USER_3)]:
        delta = delta_ids(tok, history, user, reply_ended=ended, prefill=prefill)
        ids = ids + sampled(tok, reply, ended) + delta
        history = [*history, {"role": "assistant", "content": ""}, user]
    assert ids == full_render(tok, [("2</action>", USER_2), ("look", USER_3)], prefill)


def test_delta_ignores_history_contents(smol_tokenizer):
    tok = smol_tokenizer
    with_reply = [SYSTEM, USER_1, {"role": "assistant", "content": "1</action>"}, USER_2]
    placeholder = [SYSTEM, USER_1, {"role": "assistant", "content": ""}, USER_2]
    for ended in (True, False):
        assert delta_ids(tok, with_reply, USER_3, ended) == delta_ids(tok, placeholder, USER_3, ended)


def test_sampled_ids_are_kept_even_when_not_canonical(smol_tokenizer):
    """A model may sample a non-canonical split of a word ("go" as "g" + "o"); appends keep the
    sampled ids verbatim, so the learner sees them, while a re-render would not."""
    tok = smol_tokenizer
    split = encode(tok, "g") + encode(tok, "o")
    assert split != encode(tok, "go")  # the premise: two ids where the tokenizer makes one
    prompt = render_prompt(tok, [SYSTEM, USER_1], "<action>")
    delta = delta_ids(tok, [SYSTEM, USER_1], USER_2, reply_ended=False, prefill="<action>")
    ids = prompt + split + delta
    assert ids[len(prompt) : len(prompt) + 2] == split
    assert ids != full_render(tok, [("go", USER_2)], "<action>")
    assert tok.decode(ids) == tok.decode(full_render(tok, [("go", USER_2)], "<action>"))


def test_render_prompt_appends_prefill_ids(smol_tokenizer):
    tok = smol_tokenizer
    bare = render_prompt(tok, [SYSTEM, USER_1])
    assert tok.decode(bare).endswith("<|im_start|>assistant\n")
    assert render_prompt(tok, [SYSTEM, USER_1], "<action>") == bare + encode(tok, "<action>")
    assert encode(tok, "") == []


def test_template_kwargs_reach_the_template(smol_tokenizer):
    """Thinking on/off for templates that read a flag (Qwen3's `enable_thinking`): a template
    that renders the flag shows it in both the prompt and the per-turn delta."""
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}]
    on = tok.decode(render_prompt(tok, messages))
    off = tok.decode(render_prompt(tok, messages, template_kwargs={"enable_thinking": False}))
    assert "<think>" not in on and off.endswith("<think>\n\n</think>\n\n")
    delta = tok.decode(delta_ids(tok, messages, {"role": "user", "content": "go"}, True, "", {"enable_thinking": False}))
    assert delta.endswith("<think>\n\n</think>\n\n")


def test_check_template_passes_smollm2_and_finds_a_template_that_rewrites_history(smol_tokenizer):
    import copy

    from agents.chat import check_template

    turns = [("Goal: x\nYou see a box.", "open box"), ("It opens.", "take key"), ("Done?", "yes")]
    equal, report = check_template(smol_tokenizer, turns, system="Reply in <action>.", prefill="<action>")
    assert equal, report
    # A template that renders past assistant turns differently from how they were sampled (here:
    # upper-cased, like templates that strip past reasoning): appends and full render disagree.
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    equal, report = check_template(tok, turns)
    assert not equal and "first difference at token" in report and "OPEN BOX" in report


@pytest.mark.parametrize("name", ["numbered", "action_tag", "boxed", "tool_call"])
def test_every_format_is_token_exact_on_smollm2(smol_tokenizer, name):
    """`entrorl check-template smollm2-135m-instruct --format NAME` passes for every format."""
    from agents.rollout import check_format_template

    equal, report = check_format_template(smol_tokenizer, name)
    assert equal, report
