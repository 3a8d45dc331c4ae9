"""Chat rendering and token-exact appends.

The learner must train on exactly the ids the engine sampled, so history is never re-rendered to
build training data. A conversation's token ids grow by appends only:

    prompt  = render(messages, add_generation_prompt) + prefill
    turn k  = sampled ids (loss_mask 1) + delta(next message) (loss_mask 0)

`delta` is the template's text between the end of an assistant reply and the next generation
prompt, tokenized on its own. It starts with a special token (or the closing one we add), so
tokenizing it separately cannot merge with the sampled ids.
"""

from __future__ import annotations

from typing import Any

_PLACEHOLDER = "\x00ENTRORL_REPLY\x00"


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def render_prompt(
    tokenizer: Any, messages: list[dict], prefill: str = "", template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of `messages` followed by the generation prompt and an optional assistant prefill.
    `template_kwargs` go to the chat template (e.g. Qwen3's `enable_thinking`)."""
    ids = _ids(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **(template_kwargs or {}))
    )
    return ids + encode(tokenizer, prefill)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def eos_text(tokenizer: Any) -> str:
    return tokenizer.eos_token or ""


def delta_ids(
    tokenizer: Any,
    history: list[dict],
    message: dict,
    reply_ended: bool,
    prefill: str = "",
    template_kwargs: dict | None = None,
) -> list[int]:
    """Ids to append after an assistant reply so that `message` follows and the next reply starts.

    `history` is the conversation up to (not including) the assistant reply; only its role
    structure matters. `reply_ended` says whether the sampled reply already ends with the
    end-of-turn token; if not (cut by a token budget), the delta closes the turn itself.
    """
    rendered = tokenizer.apply_chat_template(
        [*history, {"role": "assistant", "content": _PLACEHOLDER}, message],
        add_generation_prompt=True,
        tokenize=False,
        **(template_kwargs or {}),
    )
    suffix = rendered.split(_PLACEHOLDER, 1)[1]
    end = eos_text(tokenizer)
    if reply_ended and end and suffix.startswith(end):
        suffix = suffix[len(end) :]
    return encode(tokenizer, suffix) + encode(tokenizer, prefill)


def check_template(
    tokenizer: Any, turns: list[tuple[str, str]], system: str = "", prefill: str = "", template_kwargs: dict | None = None
) -> tuple[bool, str]:
    """Do per-turn appends give the ids a full render of the same conversation gives?

    `turns` are (user message, assistant reply) pairs. The appended ids are what a rollout
    builds: the first prompt, then each reply as the engine would sample it (prefill + reply +
    end-of-turn token) and the template delta to the next user message. The full render is the
    chat template over the whole conversation. Returns (equal, report); the report names the
    first differing position with both sides decoded around it. A difference is not always a
    bug (templates that drop past reasoning, e.g. Qwen3's, differ by design): the trainer always
    uses the appended ids, which are what the engine saw.
    """
    head = [{"role": "system", "content": system}] if system else []
    messages = [*head, {"role": "user", "content": turns[0][0]}]
    appended = render_prompt(tokenizer, messages, prefill, template_kwargs)
    for k, (_, reply) in enumerate(turns):
        appended += encode(tokenizer, reply) + [tokenizer.eos_token_id]
        if k + 1 == len(turns):
            break
        message = {"role": "user", "content": turns[k + 1][0]}
        appended += delta_ids(tokenizer, messages, message, True, prefill, template_kwargs)
        messages = [*messages, {"role": "assistant", "content": prefill + reply}, message]
    full_messages = [*messages, {"role": "assistant", "content": prefill + turns[-1][1]}]
    full = _ids(tokenizer.apply_chat_template(full_messages, tokenize=True, **(template_kwargs or {})))
    # the full render closes the last turn the template's way; compare up to our last eos
    if full[: len(appended)] == appended:
        return True, f"per-turn appends equal the full render ({len(appended)} tokens, {len(turns)} turns)"
    pairs = zip(appended, full, strict=False)
    at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(appended), len(full)))
    window = slice(max(at - 8, 0), at + 8)
    return False, (
        f"first difference at token {at} of {len(appended)}:\n"
        f"  appended: {tokenizer.decode(appended[window])!r}\n"
        f"  full:     {tokenizer.decode(full[window])!r}"
    )
