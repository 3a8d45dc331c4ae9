"""Supervised fine-tuning data: a file of OpenAI-format chats -> `Trajectory` records.

A JSONL file holds one `{"messages": [...], "tools": [...]}` object per line ("tools" optional);
a Parquet file (`.parquet`, read with pyarrow) one per row, in a `messages` column (and an
optional `tools` column), as verl's and TRL's chat datasets store them. The messages are first
normalised to what entrorl's own rollouts feed the model (`agents.prompts.ToolCalling`,
`environments.math_env`): an assistant's OpenAI `tool_calls` become Hermes `<tool_call>` blocks
after its text, and `tool` results become one user turn of `<tool_response>` blocks, so SFT teaches
the format RL later samples and parses. "tools" is not rendered (the system message carries the
specs, as ToolCalling's does); it only checks the called names.

Ids are the chat template's text cut at each assistant turn: where the generation prompt ends and
where the turn's end-of-turn (eos) token ends, each piece tokenized on its own, as a rollout
builds them (prompt ids, then sampled ids). The loss covers the reply and its end-of-turn token
(the model learns to stop) but not the turn header nor a newline the template adds after it. A
template that re-renders earlier turns (e.g. drops past reasoning) is refused, not guessed around.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agents.chat import encode, eos_text
from agents.types import Trajectory

ROLES = ("system", "user", "assistant", "tool")
_SHAPE = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'


class ChatDataError(ValueError):
    """A bad SFT data line; the message names the file, the 1-based line number and the fix."""


def chat_samples(
    path: str | Path, tokenizer: Any, template_kwargs: dict | None = None, max_tokens: int = 0
) -> list[Trajectory]:
    """One `Trajectory` per conversation of `path` (JSONL, or Parquet when it ends in .parquet):
    the prompt is everything before the first assistant turn, `loss_mask` is 1 on assistant
    turns only. `max_tokens > 0` refuses longer conversations (rather than truncating them
    silently). A bad conversation fails naming `path:LINE` (JSONL, 1-based) or `path:row N`
    (Parquet, 0-based as pandas and pyarrow count)."""
    path = Path(path)
    parquet = path.suffix == ".parquet"
    records, parse = (_parquet_records(path), _read_record) if parquet else (_jsonl_records(path), _read_line)
    samples = []
    for where, raw in records:
        try:
            sample = _sample(parse(raw), tokenizer, template_kwargs, max_tokens, len(samples))
        except ChatDataError as error:
            raise ChatDataError(f"{path}:{where}: {error}") from None
        sample.info = {"source": str(path), "row" if parquet else "line": where}
        samples.append(sample)
    if not samples:
        shape = "rows with a messages column" if parquet else 'one {"messages": [...]} JSON object per line'
        raise ChatDataError(f"{path}: no conversations; write {shape}")
    return samples


def _jsonl_records(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) per non-blank line."""
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() cuts
    for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            yield line_no, line


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("row N", {"messages": ..., "tools": ...}) per row. Parquet stores the messages as
    structs of one schema, so a field a message lacks comes back as None (a user turn's
    tool_calls); `_message` reads None as absent."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ChatDataError(
            f"{path}: reading Parquet needs pyarrow; pip install 'entrorl[data]' (or pyarrow), or give a JSONL file"
        ) from None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise ChatDataError(f"{path}: not a readable Parquet file ({error})") from None
    if "messages" not in table.column_names:
        raise ChatDataError(
            f"{path}: no 'messages' column (columns: {', '.join(table.column_names)}); "
            "store each conversation's OpenAI-format messages in a column named messages"
        )
    columns = [name for name in ("messages", "tools") if name in table.column_names]
    for row, record in enumerate(table.select(columns).to_pylist()):
        yield f"row {row}", record


def render_conversation(
    messages: list[dict], tokenizer: Any, template_kwargs: dict | None = None
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole OpenAI-format conversation; the mask is 1 on assistant turns."""
    ids, mask, _ = _render(normalize_messages(messages), tokenizer, template_kwargs)
    return ids, mask


def normalize_messages(messages: list, tool_names: set[str] | None = None) -> list[dict]:
    """Validated {role, content} messages with tool calls and results in entrorl's Hermes text."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError('"messages" is not a non-empty list; give the conversation as a list of messages')
    out: list[dict] = []
    for k, message in enumerate(messages):
        role, content = _message(message, f"messages[{k}]", tool_names)
        if role != "tool":
            out.append({"role": role, "content": content})
            continue
        block = f"<tool_response>\n{content}\n</tool_response>"
        if k > 0 and messages[k - 1]["role"] == "tool":  # parallel results: one turn, as math_env sends
            out[-1]["content"] += "\n" + block
        else:
            out.append({"role": "user", "content": block})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise ChatDataError("no assistant message; SFT trains on assistant turns, add at least one")
    if roles[0] == "assistant":
        raise ChatDataError("starts with an assistant message; put the message it answers before it")
    return out


def _message(message: Any, where: str, tool_names: set[str] | None) -> tuple[str, str]:
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES:
        raise ChatDataError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
    content, calls = message.get("content"), message.get("tool_calls")
    if content is None and role == "assistant" and calls:
        content = ""  # OpenAI writes null content beside tool calls
    if not isinstance(content, str):
        raise ChatDataError(
            f"{where} ({role}) content is {type(content).__name__}, not a string; join its text into one string"
        )
    if calls is None:
        return role, content
    if role != "assistant" or not isinstance(calls, list):
        raise ChatDataError(f"{where}: only assistant messages have tool_calls (a list); fix or drop them")
    blocks = [_tool_block(call, f"{where}.tool_calls[{j}]", tool_names) for j, call in enumerate(calls)]
    return role, "\n".join(part for part in (content, *blocks) if part)


def _tool_block(call: Any, where: str, tool_names: set[str] | None) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or (call.get("type") or "function") != "function":
        raise ChatDataError(f"{where} is not a function call; write it as {_SHAPE}")
    name, args = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise ChatDataError(f"{where} has no function name; write it as {_SHAPE}")
    if tool_names is not None and name not in tool_names:
        raise ChatDataError(f'{where} calls {name!r}, not in "tools"; add its spec or fix the name')
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as error:
            raise ChatDataError(f"{where} arguments are not JSON ({error}); give an object") from None
    if not isinstance(args, dict):
        kind = "missing" if args is None else type(args).__name__
        raise ChatDataError(f"{where} arguments are {kind}, not a JSON object; give them as one")
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _read_line(line: str) -> list[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ChatDataError(f"not valid JSON ({error}); write one JSON object per line") from None
    return _read_record(record)


def _read_record(record: Any) -> list[dict]:
    if not isinstance(record, dict) or record.get("messages") is None:
        raise ChatDataError('no "messages" key; write {"messages": [{"role": ..., "content": ...}, ...]}')
    tools = record.get("tools")
    return normalize_messages(record["messages"], None if tools is None else _tool_names(tools))


def _tool_names(tools: Any) -> set[str]:
    names = set()
    for spec in tools if isinstance(tools, list) else [None]:
        spec = spec.get("function", spec) if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ChatDataError('"tools" must be a list of {"function": {"name": ...}} specs; fix it')
        names.add(spec["name"])
    return names


def _render(
    messages: list[dict], tokenizer: Any, template_kwargs: dict | None
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(ids, loss_mask, token spans of the assistant turns) of normalised messages."""

    def text(upto: int, generation_prompt: bool) -> str:
        kwargs = {"add_generation_prompt": generation_prompt, **(template_kwargs or {})}
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, **kwargs)

    full = text(len(messages), False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ids: list[int] = []
    mask: list[int] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for n, i in enumerate(turns, 1):
        start, end = _prefix_end(full, text(i, True), n), _prefix_end(full, text(i + 1, False), n)
        end = _turn_end(full, start, end, eos_text(tokenizer))
        before, reply = encode(tokenizer, full[at:start]), encode(tokenizer, full[start:end])
        ids += before
        spans.append((len(ids), len(ids) + len(reply)))
        ids += reply
        mask += [0] * len(before) + [1] * len(reply)
        at = end
    tail = encode(tokenizer, full[at:])
    return ids + tail, mask + [0] * len(tail), spans


def _prefix_end(full: str, prefix: str, turn: int) -> int:
    if not full.startswith(prefix):
        raise ChatDataError(
            f"the chat template renders the conversation up to assistant turn {turn} differently from the "
            "whole conversation (it rewrites earlier turns, e.g. drops past reasoning); use a template "
            "or template_kwargs that render turns append-only"
        )
    return len(prefix)


def _turn_end(full: str, start: int, end: int, eos: str) -> int:
    """End of the trained span: through the end-of-turn token, not the whitespace after it."""
    if end < start:
        raise ChatDataError("the template's generation prompt is longer than its assistant header; fix it")
    span = full[start:end]
    cut = span.rfind(eos) if eos else -1
    if cut >= 0 and not span[cut + len(eos) :].strip():
        return start + cut + len(eos)
    return end


def _sample(
    messages: list[dict], tokenizer: Any, template_kwargs: dict | None, max_tokens: int, index: int
) -> Trajectory:
    ids, mask, spans = _render(messages, tokenizer, template_kwargs)
    if max_tokens > 0 and len(ids) > max_tokens:
        raise ChatDataError(
            f"the conversation is {len(ids)} tokens, over sft.max_tokens={max_tokens}; raise sft.max_tokens or drop the line"
        )
    split = spans[0][0]
    n = len(ids) - split
    return Trajectory(
        prompt_ids=ids[:split],
        response_ids=ids[split:],
        loss_mask=mask[split:],
        rollout_logprobs=[0.0] * n,  # no sampling engine: SFT's loss does not read them
        entropies=[0.0] * n,
        reward=0.0,
        group_id=index,
        traj_id=index,
        turn_spans=[(s - split, e - split) for s, e in spans],
    )
