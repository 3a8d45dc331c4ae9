"""HF transformers engine: batched sampling with a KV cache over all active episodes.

One `generate` call left-pads every prompt into one batch, prefills once, then decodes token by
token. A prefix cache (prefix_cache.py) keeps the KV of recent sequences, so the next turn of an
episode, or a fork of it, prefills only the tokens past what was already encoded. We sample
ourselves (instead of `model.generate`) so that the logprob and the exact entropy of the
distribution each token was drawn from come out of the same softmax that drew it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from agents.engines.base import SamplingParams
from agents.engines.prefix_cache import PrefixCache
from agents.types import GenerationResult


class HFEngine:
    """`prefix_cache_bytes` bounds the prefix cache (0 = off). Its KV belongs to the current
    weights: `load_weights` empties it; call `reset_prefix_cache` after changing `model` directly."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu", prefix_cache_bytes: int = 1 << 30):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0}
        self._cache_kwarg = _cache_kwarg(self.model)

    @classmethod
    def from_pretrained(
        cls, path: str, device: str = "cpu", dtype: str = "float32", prefix_cache_bytes: int = 1 << 30
    ) -> HFEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        return cls(model, tokenizer, device, prefix_cache_bytes)

    def reset_prefix_cache(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def take_stats(self) -> dict[str, float]:
        """Prompt tokens asked for and those served from the prefix cache since the last call."""
        stats, self._stats = self._stats, dict.fromkeys(self._stats, 0)
        return {f"engine/{k}": float(v) for k, v in stats.items()}

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"load_weights: engine model has no parameter {name!r}")
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        self.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenerationResult]:
        if not prompts:
            return []
        generator = _generator(sampling.seed, self.device)
        # Identical prompts (every episode of a group starts alike) are prefilled once; their KV
        # cache rows are then copied out to every request that shares them.
        unique: dict[tuple[int, ...], int] = {}
        inverse = torch.tensor(
            [unique.setdefault(tuple(p), len(unique)) for p in prompts], device=self.device
        )
        past, input_ids, attention_mask = self._prefill_inputs([list(p) for p in unique])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        batch = len(prompts)
        out_ids: list[list[int]] = [[] for _ in range(batch)]
        out_logprobs: list[list[float]] = [[] for _ in range(batch)]
        out_entropies: list[list[float]] = [[] for _ in range(batch)]
        finish = ["length"] * batch
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(sampling.max_new_tokens):
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: past},
            )
            past, logits = _cache_of(outputs), outputs.logits[:, -1, :]
            if step == 0 and len(unique) < batch:  # after prefill
                past.reorder_cache(inverse)
                logits, attention_mask, position_ids = (
                    logits[inverse],
                    attention_mask[inverse],
                    position_ids[inverse],
                )
            tokens, logprobs, entropies = _sample(logits.float(), sampling, generator)
            for i in (~done).nonzero().flatten().tolist():
                out_ids[i].append(int(tokens[i]))
                out_logprobs[i].append(float(logprobs[i]))
                out_entropies[i].append(float(entropies[i]))
                if int(tokens[i]) in self.eos_ids or self._hit_stop(out_ids[i], sampling.stop):
                    finish[i] = "stop"
                    done[i] = True
            if bool(done.all()):
                break
            # Finished rows keep decoding a pad token (cheaper than reshaping the KV cache).
            input_ids = torch.where(done, torch.full_like(tokens, self.pad_id), tokens).unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=-1)
            position_ids = position_ids[:, -1:] + 1
        self._remember(prompts, out_ids, past, attention_mask)
        return [
            GenerationResult(out_ids[i], out_logprobs[i], out_entropies[i], finish[i]) for i in range(batch)
        ]

    def _prefill_inputs(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(past, input_ids, attention_mask) for the prefill. Each row's cached prefix goes into
        `past` right-aligned ([pad | cached]) and its remaining tokens into `input_ids` left-padded,
        so a row reads [pad | cached | pad | rest]: the mask hides both pads and the position ids
        (mask cumsum) continue the cached positions."""
        hits = [self._lookup(p) for p in prompts]
        self._stats["prompt_tokens"] += sum(len(p) for p in prompts)
        self._stats["cached_prompt_tokens"] += sum(n for n, _ in hits)
        width = max(n for n, _ in hits)
        rest_ids, rest_mask = _left_pad(
            [p[n:] for p, (n, _) in zip(prompts, hits, strict=True)], self.pad_id, self.device
        )
        if width == 0:
            return None, rest_ids, rest_mask
        some_kv = next(kv for _, kv in hits if kv is not None)
        layers, _, heads, _, head_dim = some_kv.shape
        kv_past = torch.zeros(
            layers, 2, len(prompts), heads, width, head_dim, dtype=some_kv.dtype, device=self.device
        )
        past_mask = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, (n, kv) in enumerate(hits):
            if n:
                kv_past[:, :, row, :, width - n :] = kv
                past_mask[row, width - n :] = 1
        from transformers import DynamicCache

        past = DynamicCache(
            ddp_cache_data=[(kv_past[layer, 0], kv_past[layer, 1]) for layer in range(layers)]
        )
        return past, rest_ids, torch.cat([past_mask, rest_mask], dim=-1)

    def _lookup(self, prompt: list[int]) -> tuple[int, torch.Tensor | None]:
        # At least the last prompt token is run: its logits give the first sampled token.
        if self.prefix_cache is None or len(prompt) < 2:
            return 0, None
        return self.prefix_cache.lookup(prompt, limit=len(prompt) - 1)

    def _remember(
        self, prompts: list[list[int]], out_ids: list[list[int]], past: Any, attention_mask: torch.Tensor
    ) -> None:
        """Cache each row's prompt + the reply tokens that were fed back (all but the last)."""
        if self.prefix_cache is None or past is None:
            return
        layers = getattr(past, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            self.prefix_cache = None  # sliding-window or other special caches: not handled, off
            return
        filled = attention_mask[:, : past.get_seq_length()].bool()
        keys = torch.stack([layer.keys for layer in layers])  # [layers, batch, heads, seq, head_dim]
        values = torch.stack([layer.values for layer in layers])
        for row, prompt in enumerate(prompts):
            tokens = list(prompt) + out_ids[row][:-1]
            positions = filled[row].nonzero().flatten()[: len(tokens)]
            kv = torch.stack([keys[:, row, :, positions], values[:, row, :, positions]], dim=1)
            self.prefix_cache.store(tokens, kv)

    def _hit_stop(self, ids: list[int], stops: list[str]) -> bool:
        if not stops:
            return False
        tail = self.tokenizer.decode(ids[-8:], skip_special_tokens=False)
        return any(tail.endswith(s) or s in tail for s in stops)


def _sample(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (token, its logprob, entropy) of the distribution drawn from.

    Greedy (temperature 0) reports the logprob and entropy of the untempered distribution.
    """
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    logits = _filter(logits / temperature, sampling.top_k, sampling.top_p)
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp.masked_fill(probs == 0, 0.0)).sum(-1)
    if sampling.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = logits.argmax(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
    if not ids:
        raise ValueError(
            "HFEngine: neither the model's generation_config nor the tokenizer names an EOS token"
        )
    return ids


def _cache_kwarg(model: Any) -> str:
    """The name the model's forward takes its KV cache under: `cache` since transformers 5.x
    renamed it (the old `past_key_values` still works there but warns on every call), else
    `past_key_values` (older transformers, the GPU machines' included)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(outputs: Any) -> Any:
    """The KV cache a forward returned, read under the field name its output class declares
    (reading the old name on a renamed class logs a deprecation)."""
    fields = getattr(type(outputs), "__dataclass_fields__", {})
    return outputs.cache if "cache" in fields else outputs.past_key_values


def _generator(seed: int | None, device: str) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
