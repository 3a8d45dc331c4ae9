"""SFT data: OpenAI chat JSONL -> Trajectory, checked against hand-written ChatML renders of SmolLM2."""

from __future__ import annotations

import json

import pytest

from agents.chat_data import ChatDataError, chat_samples, normalize_messages, render_conversation
from agents.parsing import ToolCall, parse_tool_calls

SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def tool_conversation(arguments='{"a": 2, "b": 3}') -> list[dict]:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": arguments}}
    return [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "Let me add.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "The answer is \\boxed{5}."},
    ]


# the same conversation as SmolLM2's ChatML template renders it, cut where the loss switches
TOOL_PIECES = [
    ("<|im_start|>system\nYou are a calculator.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n", 0),
    ("<|im_start|>assistant\n", 0),
    ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>', 1),
    ("\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n", 0),
    ("The answer is \\boxed{5}.<|im_end|>", 1),
    ("\n", 0),
]


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, pieces) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for text, loss in pieces:
        piece = encode(tok, text)
        ids += piece
        mask += [loss] * len(piece)
    return ids, mask


def masked_texts(tok, ids, mask) -> list[str]:
    """Decoded runs of loss_mask == 1."""
    runs, run = [], []
    for token, loss in zip([*ids, None], [*mask, 0], strict=True):
        if loss:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def write_jsonl(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_tool_conversation_matches_hand_written_render(smol_tokenizer):
    tok = smol_tokenizer
    ids, mask = render_conversation(tool_conversation(), tok)
    want_ids, want_mask = expected(tok, TOOL_PIECES)
    assert ids == want_ids
    assert mask == want_mask
    assert masked_texts(tok, ids, mask) == [TOOL_PIECES[2][0], TOOL_PIECES[4][0]]
    # the '\n' after each <|im_end|> and the assistant header stay unmasked
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [k for k, token in enumerate(ids) if token == im_end]
    assert [mask[k] for k in ends] == [0, 0, 1, 0, 1]
    assert all(ids[k + 1] == encode(tok, "\n")[0] and mask[k + 1] == 0 for k in ends)
    # piecewise tokenization equals tokenizing the whole render at once
    assert ids == encode(
        tok, tok.apply_chat_template(normalize_messages(tool_conversation()), tokenize=False)
    )


def test_rendered_tool_call_parses_back_as_entrorl_reads_it(smol_tokenizer):
    ids, mask = render_conversation(tool_conversation(), smol_tokenizer)
    first_reply = masked_texts(smol_tokenizer, ids, mask)[0]
    assert parse_tool_calls(first_reply) == [ToolCall("add", {"a": 2, "b": 3})]


def test_parallel_calls_and_tool_results_merge_like_rollouts(smol_tokenizer):
    calls = [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
        {"type": "function", "function": {"name": "echo", "arguments": '{"text": "é"}'}},
    ]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "3"},
        {"role": "tool", "content": "é"},
        {"role": "assistant", "content": "done"},
    ]
    assert normalize_messages(messages) == [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "echo", "arguments": {"text": "é"}}\n</tool_call>',
        },
        {
            "role": "user",
            "content": "<tool_response>\n3\n</tool_response>\n<tool_response>\né\n</tool_response>",
        },
        {"role": "assistant", "content": "done"},
    ]
    # ChatML cuts fall on special tokens: piecewise ids equal tokenizing the whole render at once
    ids, mask = render_conversation(messages, smol_tokenizer)
    whole = smol_tokenizer.apply_chat_template(normalize_messages(messages), tokenize=False)
    assert ids == encode(smol_tokenizer, whole)
    assert masked_texts(smol_tokenizer, ids, mask)[1] == "done<|im_end|>"


def test_arguments_as_dict_or_json_string_render_identically(smol_tokenizer):
    as_string = render_conversation(tool_conversation('{"a": 2, "b": 3}'), smol_tokenizer)
    as_dict = render_conversation(tool_conversation({"a": 2, "b": 3}), smol_tokenizer)
    assert as_string == as_dict
    assert as_dict[0] == expected(smol_tokenizer, TOOL_PIECES)[0]


def test_chat_samples_splits_prompt_and_response(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    simple = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    path = write_jsonl(
        tmp_path / "sft.jsonl", [simple, "", "   ", {"messages": tool_conversation(), "tools": tools}]
    )
    samples = chat_samples(path, tok)
    assert len(samples) == 2
    first, second = samples
    assert [s.info for s in samples] == [{"source": path, "line": 1}, {"source": path, "line": 4}]
    assert [(s.group_id, s.traj_id) for s in samples] == [(0, 0), (1, 1)]

    # the default system message SmolLM2's template adds is part of the prompt
    assert first.prompt_ids == encode(
        tok, SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert first.response_ids == encode(tok, "Hello!<|im_end|>") + encode(tok, "\n")
    assert first.turn_spans == [(0, len(encode(tok, "Hello!<|im_end|>")))]
    assert first.loss_mask == [1] * first.turn_spans[0][1] + [0]

    ids, mask = expected(tok, TOOL_PIECES)
    split = len(expected(tok, TOOL_PIECES[:2])[0])
    assert second.prompt_ids == ids[:split]
    assert second.response_ids == ids[split:]
    assert second.loss_mask == mask[split:]
    assert [tok.decode(second.response_ids[s:e]) for s, e in second.turn_spans] == [
        TOOL_PIECES[2][0],
        TOOL_PIECES[4][0],
    ]
    assert second.turn_spans[0][0] == 0
    for sample in samples:
        assert sample.rollout_logprobs == sample.entropies == [0.0] * len(sample.response_ids)
        assert sample.reward == 0.0


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _with_call(function, tools=None) -> dict:
    call = {"type": "function", "function": function}
    line = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
    }
    return line if tools is None else {**line, "tools": tools}


BAD_LINES = {
    "not json": ("{oops", "not valid JSON"),
    "no messages": ({"conversation": GOOD["messages"]}, 'no "messages" key'),
    "unknown role": ({"messages": [{"role": "developer", "content": "x"}, *GOOD["messages"]]}, "'developer'"),
    "list content": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "not a string"),
    "no assistant": ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
    "assistant first": ({"messages": GOOD["messages"][::-1]}, "starts with an assistant"),
    "arguments not json": (_with_call({"name": "add", "arguments": "{a: 1"}), "arguments are not JSON"),
    "arguments a list": (_with_call({"name": "add", "arguments": "[1, 2]"}), "arguments are list"),
    "arguments missing": (_with_call({"name": "add"}), "arguments are missing"),
    "no name": (_with_call({"arguments": {}}), "no function name"),
    "unknown tool": (_with_call({"name": "mul", "arguments": {}}, [{"name": "add"}]), "'mul'"),
    "bad tools": (_with_call({"name": "add", "arguments": {}}, "add"), '"tools" must be a list'),
    "user tool_calls": (
        {"messages": [{"role": "user", "content": "q", "tool_calls": []}]},
        "only assistant messages",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(case, tmp_path, smol_tokenizer):
    bad, what = BAD_LINES[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(ChatDataError) as error:
        chat_samples(path, smol_tokenizer)
    assert str(error.value).startswith(f"{path}:3: ")
    assert what in str(error.value)


def test_empty_file_and_too_long_conversation(tmp_path, smol_tokenizer):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ChatDataError, match="no conversations") as error:
        chat_samples(empty, smol_tokenizer)
    assert empty in str(error.value)

    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, GOOD])
    length = len(render_conversation(GOOD["messages"], smol_tokenizer)[0])
    assert len(chat_samples(path, smol_tokenizer, max_tokens=length)) == 2
    with pytest.raises(ChatDataError, match=f"{path}:1: the conversation is {length} tokens.*sft.max_tokens"):
        chat_samples(path, smol_tokenizer, max_tokens=length - 1)


class RewritingTemplate:
    """A tokenizer whose template marks the final message, so earlier renders are not prefixes."""

    def __init__(self, tok):
        self.tok, self.eos_token = tok, tok.eos_token

    def __call__(self, text, **kwargs):
        return self.tok(text, **kwargs)

    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
        text = "".join(
            f"[{m['role']}{'*' if k == len(messages) - 1 else ''}] {m['content']}\n"
            for k, m in enumerate(messages)
        )
        return text + ("[assistant] " if add_generation_prompt else "")


def test_template_that_rewrites_earlier_turns_is_refused(smol_tokenizer):
    with pytest.raises(ChatDataError, match="assistant turn 1 differently"):
        render_conversation(GOOD["messages"], RewritingTemplate(smol_tokenizer))


def write_parquet(path, records) -> str:
    """`records` as a Parquet table, the way pandas/datasets write chat data: pyarrow infers one
    struct schema for all messages, so a key one message lacks comes back as None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def test_parquet_rows_render_as_their_jsonl_lines(tmp_path, smol_tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "description": "a + b"}}]
    records = [
        GOOD,
        {"messages": tool_conversation(), "tools": tools},
    ]
    jsonl = chat_samples(write_jsonl(tmp_path / "chats.jsonl", records), smol_tokenizer)
    path = write_parquet(tmp_path / "chats.parquet", [{**GOOD, "tools": None}, records[1]])
    parquet = chat_samples(path, smol_tokenizer)
    # the schema gives GOOD's messages tool_calls=None, tool_call_id=None: read as absent
    for row, (a, b) in enumerate(zip(jsonl, parquet, strict=True)):
        assert (b.prompt_ids, b.response_ids, b.loss_mask) == (a.prompt_ids, a.response_ids, a.loss_mask)
        assert b.info == {"source": path, "row": f"row {row}"}
    assert parquet[1].prompt_ids + parquet[1].response_ids == expected(smol_tokenizer, TOOL_PIECES)[0]


def test_bad_parquet_row_and_missing_column_are_named(tmp_path, smol_tokenizer):
    bad = {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]}
    path = write_parquet(tmp_path / "bad.parquet", [GOOD, GOOD, bad])
    with pytest.raises(ChatDataError) as error:
        chat_samples(path, smol_tokenizer)
    assert str(error.value).startswith(f"{path}:row 2: ")
    assert "starts with an assistant" in str(error.value)

    path = write_parquet(tmp_path / "prompts.parquet", [{"prompt": GOOD["messages"]}])
    with pytest.raises(ChatDataError, match=r"no 'messages' column \(columns: prompt\)"):
        chat_samples(path, smol_tokenizer)

    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ChatDataError, match="not a readable Parquet file"):
        chat_samples(tmp_path / "junk.parquet", smol_tokenizer)
