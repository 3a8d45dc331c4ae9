"""vLLM engine: token ids in, exact sampled ids + logprobs + a top-k entropy estimate out.

Same protocol as `HFEngine` (agents/engines/base.py). vLLM is imported lazily, inside this module
only (tests/test_architecture.py enforces it), so `agents` imports without vLLM installed.

What comes back per generated token:

* `token_ids`: the ids vLLM sampled (prompts go in as `TokensPrompt`, never as text).
* `logprobs`: log p(sampled token) under the distribution it was drawn from. The engine runs with
  `logprobs_mode="processed_logprobs"`, so this is after temperature, top-k and top-p (like
  `HFEngine`); under greedy decoding it is the untempered distribution (also like `HFEngine`).
* `entropies`: an ESTIMATE of that distribution's entropy from its top-k logprobs (vLLM does not
  hand out the full distribution cheaply); `GenerationResult.entropy_is_exact` says which.
  The estimator is `estimate_entropy` below; its error on SmolLM2 is in docs_vllm.md.

Weight sync (`load_weights`) runs vLLM's in-place reload on the worker through `collective_rpc`:
on CPU vLLM pre-packs every Linear weight for oneDNN and frees the plain tensor, so writing into
`model.parameters()` would either fail or leave the packed copy stale; `reload_weights` restores
the layers, loads, and re-packs. The prefix cache is reset afterwards (its KV was computed with
the old weights).

By default the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the "uni" executor):
no spawned engine process, no `__main__` guard needed, and `load_weights` hands tensors over
without copying. `multiprocessing=True` gives vLLM's default engine-core process instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from agents.engines.base import SamplingParams
from agents.types import GenerationResult

DEFAULT_ENTROPY_TOP_K = 20  # vLLM's default max_logprobs; error on SmolLM2 in docs_vllm.md
CPU_KV_CACHE_BYTES = 1 << 30  # CPU default: 1 GiB of KV cache (SmolLM2-135M: ~23k tokens)
_TAIL_HEAD = 16  # tail ranks summed term by term before the integral takes over


class VLLMEngine:
    """A vLLM `LLM` behind the `InferenceEngine` protocol.

    `model`: an embedded model name or a local HF folder (see agents/engines/models.py).
    `gpu_memory_utilization` is vLLM's (GPU only); on CPU the KV cache is `kv_cache_memory_bytes`
    (default 1 GiB). `entropy_top_k` logprobs per token feed the entropy estimate.
    `enforce_eager` defaults to True on CPU, where vLLM's torch.compile warm-up takes minutes.
    Extra keyword arguments go to `vllm.LLM` unchanged.
    """

    entropy_is_exact = False  # entropies are top-k estimates (see estimate_entropy)

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        entropy_top_k: int = DEFAULT_ENTROPY_TOP_K,
        enforce_eager: bool | None = None,
        multiprocessing: bool = False,
        **llm_kwargs: Any,
    ):
        from agents.engines.models import resolve_model

        path = resolve_model(model)
        check_vllm_loadable(path)
        import vllm.envs

        # An in-process engine freezes vLLM's env-var cache; a later engine must see its own mode.
        getattr(vllm.envs, "disable_envs_cache", lambda: None)()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        if multiprocessing:
            # `load_weights` ships a function to the worker: vLLM pickles it only when allowed.
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        import torch
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.sleep_supported = (not self.on_cpu) and current_platform.is_sleep_mode_available()
        if enable_sleep_mode is None:
            enable_sleep_mode = self.sleep_supported
        if enforce_eager is None:
            enforce_eager = self.on_cpu
        if self.on_cpu and kv_cache_memory_bytes is None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if kv_cache_memory_bytes is not None:
            llm_kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if not multiprocessing:
            llm_kwargs.setdefault("distributed_executor_backend", "uni")
        self.entropy_top_k = entropy_top_k
        set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(
                model=path,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                enable_sleep_mode=enable_sleep_mode,
                enforce_eager=enforce_eager,
                logprobs_mode="processed_logprobs",
                max_logprobs=max(entropy_top_k, llm_kwargs.pop("max_logprobs", 0)),
                disable_log_stats=llm_kwargs.pop("disable_log_stats", True),
                **llm_kwargs,
            )
        finally:
            # vLLM's in-process CPU worker replaces torch.set_num_threads with a no-op for the
            # whole process; the caller (the learner, the tests) keeps the real one.
            torch.set_num_threads = set_num_threads
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = model_config.get_vocab_size()
        self.max_model_len = model_config.max_model_len
        self.tokenizer = self.llm.get_tokenizer()
        self.path = path
        self._asleep = False
        from vllm import SamplingParams as VSamplingParams

        self._fields = set(getattr(VSamplingParams, "__struct_fields__", ()))

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenerationResult]:
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        # A prompt that leaves no room for even one token would make vLLM reject the whole batch.
        fits = [i for i, p in enumerate(prompts) if len(p) < self.max_model_len]
        results: list[GenerationResult] = [
            GenerationResult([], [], [], "length", entropy_is_exact=False) for _ in prompts
        ]
        if not fits:
            return results
        params = [self._vllm_params(sampling, i) for i in fits]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=[int(t) for t in prompts[i]]) for i in fits],
            params if sampling.seed is not None else params[0],
            use_tqdm=False,
        )
        # greedy: vLLM reports the unfiltered distribution (HFEngine applies top-k/top-p first)
        filtered = sampling.temperature > 0 and sampling.top_k > 0
        support = min(sampling.top_k, self.vocab_size) if filtered else self.vocab_size
        completions = [output.outputs[0] for output in outputs]
        for i, result in zip(fits, self._results(completions, support), strict=True):
            results[i] = result
        return results

    def _vllm_params(self, sampling: SamplingParams, index: int) -> Any:
        from vllm import SamplingParams as VSamplingParams

        kwargs: dict[str, Any] = dict(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_tokens=sampling.max_new_tokens,
            logprobs=self.entropy_top_k,
            # every request its own stream: a group repeats one prompt and must not repeat samples
            seed=None if sampling.seed is None else sampling.seed + index,
            skip_special_tokens=False,  # stop strings see special tokens' text, as in HFEngine
        )
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)  # vLLM matches stop strings on detokenised text
        elif "detokenize" in self._fields:
            kwargs["detokenize"] = False  # we return ids only; detokenising costs (ReCall #11)
        if "flat_logprobs" in self._fields:
            kwargs["flat_logprobs"] = True  # one flat array instead of a dict per token
        return VSamplingParams(**kwargs)

    def _results(self, completions: list[Any], support: int) -> list[GenerationResult]:
        unpacked = []
        for completion in completions:
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"vLLM finished a request with reason {completion.finish_reason!r} (expected stop/length)"
                )
            token_ids = [int(t) for t in completion.token_ids]
            unpacked.append(
                (token_ids, *_unpack_logprobs(completion.logprobs, token_ids, self.entropy_top_k))
            )
        # one vectorised estimate over every generated token of the call
        estimate = estimate_entropy(
            np.concatenate([top for _, _, top in unpacked]),
            np.concatenate([sampled.extra for _, sampled, _ in unpacked]),
            support,
        )
        results, start = [], 0
        for completion, (token_ids, sampled, _) in zip(completions, unpacked, strict=True):
            end = start + len(token_ids)
            results.append(
                GenerationResult(
                    token_ids,
                    sampled.logprob.tolist(),
                    estimate.entropy[start:end].tolist(),
                    completion.finish_reason,
                    # exact only where nothing was left outside the known tokens (top-k sampling)
                    entropy_is_exact=bool(token_ids) and bool(np.all(estimate.tail_mass[start:end] <= 1e-6)),
                )
            )
            start = end
        return results

    # -- weights and memory -----------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Copy new policy weights in place (HF parameter names, as the learner has them).

        Each call should carry whole modules: vLLM fuses q/k/v and gate/up into one tensor, so
        give them together (a full state dict, or one decoder layer per call)."""
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        if self.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "uni":
            self.llm.collective_rpc(_reload_weights_on_worker, args=(weights,))  # same process
        else:
            # vLLM's RPC encoder turns tensors nested in lists into lists; ship one safetensors
            # blob instead (a copy: fine for CPU tests, not the way to sync a big GPU model)
            from safetensors.torch import save

            blob = save({name: tensor.cpu().contiguous().clone() for name, tensor in weights})
            self.llm.collective_rpc(_reload_weights_from_bytes, args=(blob,))
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> bool:
        """Free accelerator memory (weights offloaded at level 1, dropped at level 2; KV cache
        dropped). Returns False, doing nothing, where vLLM has no sleep mode (CPU)."""
        if not self.sleep_supported:
            return False
        self.llm.sleep(level=level)
        self._asleep = True
        return True

    def wake(self) -> bool:
        """Undo `sleep` (weights first, then KV cache: waking both at once can OOM, vLLM #15254).
        Returns False where there is no sleep mode."""
        if not self.sleep_supported:
            return False
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        return True

    def close(self) -> None:
        """Shut the engine down (its processes and memory); the object is unusable afterwards."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        shutdown = getattr(llm.llm_engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None


def _reload_weights_on_worker(worker: Any, weights: list[tuple[str, Any]]) -> None:
    """Runs inside the vLLM worker (through `collective_rpc`): vLLM's in-place weight reload."""
    unknown = _unknown_names(worker.model_runner.get_model(), [name for name, _ in weights])
    if unknown:
        raise KeyError(f"load_weights: engine model has no parameter {unknown[0]!r}")
    model = worker.model_runner.get_model()
    if hasattr(worker, "reload_weights"):
        worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    else:  # older vLLM: no in-place reload; only correct where weights are not re-packed
        model.load_weights(weights=iter(weights))
    _reprocess_tied_modules(model)


def _reload_weights_from_bytes(worker: Any, blob: bytes) -> None:
    from safetensors.torch import load

    _reload_weights_on_worker(worker, list(load(blob).items()))


def _reprocess_tied_modules(model: Any) -> None:
    """Re-run weight post-processing on modules that share a weight (a tied lm_head).

    The reload processes only modules that received weights: a tied lm_head receives none (its
    tensor is embed_tokens'), so on CPU it kept a oneDNN-packed copy of the OLD embedding and
    sampled from stale logits (measured: 0.1 nat logprob error after one perturbed sync)."""
    groups: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        method = getattr(module, "quant_method", None)
        if weight is None or weight.numel() == 0 or method is None:
            continue
        groups.setdefault(weight.data_ptr(), []).append(module)
    for modules in groups.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


def _unknown_names(model: Any, names: list[str]) -> list[str]:
    """HF checkpoint names the vLLM model cannot place (checked before any weight moves, since a
    failed reload half-way leaves layers unloaded). Fused modules are matched through the
    model's `packed_modules_mapping` (qkv_proj <- q/k/v_proj, gate_up_proj <- gate/up_proj)."""
    known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    unknown = []
    for name in names:
        candidates = {name}
        for fused, parts in packed.items():
            for part in parts:
                if f".{part}." in name:
                    candidates.add(name.replace(f".{part}.", f".{fused}."))
        if candidates & known:
            continue
        if name.endswith("lm_head.weight") or "rotary_emb" in name:  # tied head / recomputed
            continue
        unknown.append(name)
    return unknown


# -- logprobs and the entropy estimate -----------------------------------------------------


class _Sampled:
    def __init__(self, logprob: np.ndarray, extra: np.ndarray):
        self.logprob = logprob  # log p of the sampled token, per position
        self.extra = extra  # the same where the sampled token is outside the top-k, else -inf


def _unpack_logprobs(logprobs: Any, token_ids: list[int], k: int) -> tuple[_Sampled, np.ndarray]:
    """(sampled-token logprobs, top-k logprobs [n, k]) from vLLM's per-position logprobs.

    vLLM lists, per position, the sampled token first and then the top-k (flat format), or a
    dict {token: Logprob} holding both (the sampled token once, also when it is in the top-k)."""
    n = len(token_ids)
    top = np.full((n, k), -np.inf)
    top_ids = np.full((n, k), -1, dtype=np.int64)
    sampled = np.empty(n)
    if n == 0:
        return _Sampled(sampled, sampled.copy()), top
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs (was the request made with logprobs=k?)")
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        starts, ends = logprobs.start_indices, logprobs.end_indices
        flat_lp = np.asarray(logprobs.logprobs, dtype=np.float64)
        flat_ids = np.asarray(logprobs.token_ids, dtype=np.int64)
        flat_rank = np.asarray(logprobs.ranks, dtype=np.int64)
        for t in range(n):
            s, e = starts[t], ends[t]
            sampled[t] = flat_lp[s]
            ranks = flat_rank[s + 1 : e]
            ok = (ranks >= 1) & (ranks <= k)
            top[t, ranks[ok] - 1] = flat_lp[s + 1 : e][ok]
            top_ids[t, ranks[ok] - 1] = flat_ids[s + 1 : e][ok]
    else:  # list[dict[int, Logprob]]
        for t, (token, entries) in enumerate(zip(token_ids, logprobs, strict=True)):
            sampled[t] = entries[token].logprob
            for tid, entry in entries.items():
                if entry.rank is not None and 1 <= entry.rank <= k:
                    top[t, entry.rank - 1] = entry.logprob
                    top_ids[t, entry.rank - 1] = tid
    in_top = (top_ids == np.asarray(token_ids)[:, None]).any(axis=1)
    extra = np.where(in_top, -np.inf, sampled)
    return _Sampled(sampled, extra), top


class EntropyEstimate:
    def __init__(self, entropy: np.ndarray, lower: np.ndarray, upper: np.ndarray, tail_mass: np.ndarray):
        self.entropy = entropy  # the estimate (power-law tail)
        self.lower = lower  # guaranteed bounds on the true entropy
        self.upper = upper
        self.tail_mass = tail_mass  # probability mass outside the known tokens


def estimate_entropy(top_logprobs: Any, extra_logprob: Any, support: Any) -> EntropyEstimate:
    """Entropy of a distribution known only through its top-k log-probabilities (nats).

    `top_logprobs` [n, k]: the k largest log-probs per row (any order; -inf for tokens the
    sampler filtered out). `extra_logprob` [n]: one more known token per row (the sampled token
    when it fell outside the top-k), -inf where none. `support`: how many tokens can have
    non-zero probability (the vocabulary size, or top_k when the sampler filters to top-k).

    H = H_known + H_tail, where H_known = -sum over the known tokens of p log p (exact), and
    the tail (the M = support - #known other tokens, holding the remaining mass r) is estimated.
    Every tail token has p <= p_k (the smallest top-k probability), which bounds the tail:

        r * (-log p_k)  <=  H_tail  <=  -r log(r / M)        (upper: the mass spread uniformly)

    The estimate extends the ranked distribution as a power law from the last known rank,
    p_j = p_k (j/k)^(-a) for ranks j = k+1 .. k+M, with a >= 0 chosen so the tail holds exactly
    r (a = 0, the uniform tail, when even that holds too little). It always lies between the
    bounds. Measured through VLLMEngine on SmolLM2-135M-Instruct (k = 20, chat prompts, 48
    sampled tokens each): mean |error| 0.11 nat at T = 1 (mean H 2.3 nat; bias +0.10), 0.01 at
    T = 0.7; on tokens with H >= 3 it overestimates by ~0.28. The uniform-tail formula (the upper
    bound) is off by ~0.35 on average. k = 50 roughly halves the error. A row whose top-k list
    ends in -inf, or whose tail mass is 0, is exact.
    """
    top = np.asarray(top_logprobs, dtype=np.float64)
    if top.ndim != 2 or top.shape[1] < 1:
        raise ValueError(f"estimate_entropy: top_logprobs must be [n, k>=1], got shape {top.shape}")
    n, k = top.shape
    extra = np.full(n, -np.inf) if extra_logprob is None else np.asarray(extra_logprob, dtype=np.float64)
    finite = np.isfinite(top)
    p = np.where(finite, np.exp(np.where(finite, top, 0.0)), 0.0)
    has_extra = np.isfinite(extra)
    p_extra = np.where(has_extra, np.exp(np.where(has_extra, extra, 0.0)), 0.0)
    h_known = -(p * np.where(finite, top, 0.0)).sum(1) - p_extra * np.where(has_extra, extra, 0.0)
    n_known = finite.sum(1) + has_extra
    m = np.maximum(np.asarray(support) - n_known, 0).astype(np.float64)
    r = np.clip(1.0 - p.sum(1) - p_extra, 0.0, 1.0)
    r = np.where(finite.all(1) & (m > 0), r, 0.0)  # a -inf in the top-k: nothing is left over
    p_k = np.where(finite, p, np.inf).min(1)
    p_k = np.where(np.isfinite(p_k) & (p_k > 0), p_k, 1.0)
    live = r > 0
    safe_r = np.where(live, r, 1.0)
    safe_m = np.where(live, m, 1.0)
    lower = h_known + np.where(live, -safe_r * np.log(p_k), 0.0)
    upper = h_known + np.where(live, -safe_r * np.log(safe_r / safe_m), 0.0)
    tail = np.where(live, _power_law_tail_entropy(safe_r, p_k, k, safe_m), 0.0)
    estimate = np.clip(h_known + tail, lower, upper)
    return EntropyEstimate(estimate, lower, upper, r)


def _power_law_tail_entropy(r: np.ndarray, p_k: np.ndarray, k: int, m: np.ndarray) -> np.ndarray:
    """-sum q_j log q_j for q_j = c (j/k)^(-a), j = k+1..k+m, sum q_j = r, c ~ p_k (see above).

    Sums over the first _TAIL_HEAD ranks term by term, the rest by the midpoint integral."""
    a = _solve_exponent(r / p_k, k, m)
    s, t = _power_sums(a, k, m)
    c = r / s
    return -r * np.log(c) + a * c * t


def _solve_exponent(target: np.ndarray, k: int, m: np.ndarray) -> np.ndarray:
    """a >= 0 with sum_{j=k+1}^{k+m} (j/k)^(-a) = target, by bisection (0 where m <= target)."""
    lo, hi = np.zeros_like(target), np.full_like(target, 1.0)
    for _ in range(12):  # grow hi until the sum is below the target
        s, _ = _power_sums(hi, k, m)
        grow = s > target
        if not grow.any():
            break
        hi = np.where(grow, hi * 4.0, hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        s, _ = _power_sums(mid, k, m)
        above = s > target
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.where(m <= target, 0.0, (lo + hi) / 2)


def _power_sums(a: np.ndarray, k: int, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum u^-a, sum u^-a ln u) over u = j/k, j = k+1..k+m: exact head, integral for the rest."""
    head = np.arange(1, _TAIL_HEAD + 1, dtype=np.float64)
    u = (k + head) / k  # [H]
    in_head = head[None, :] <= m[:, None]  # [n, H]
    lu = np.log(u)[None, :]
    w = np.where(in_head, np.exp(-a[:, None] * lu), 0.0)
    s = w.sum(1)
    t = (w * lu).sum(1)
    rest = m > _TAIL_HEAD
    u0 = (k + _TAIL_HEAD + 0.5) / k
    u1 = (k + np.maximum(m, _TAIL_HEAD) + 0.5) / k
    s_int, t_int = _power_integrals(a, u0, u1)
    s = s + np.where(rest, k * s_int, 0.0)
    t = t + np.where(rest, k * t_int, 0.0)
    return s, t


def _power_integrals(a: np.ndarray, u0: float, u1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int u^-a du, int u^-a ln u du) from u0 to u1, stable near a = 1."""
    b = 1.0 - a  # int u^(b-1) du = (u^b - 1)/b ... written through expm1 for b -> 0
    l0, l1 = math.log(u0), np.log(u1)

    def prim(lu: Any) -> tuple[Any, Any]:
        # F(u) = (e^{b lu} - 1)/b  and  G(u) = lu e^{b lu}/b - (e^{b lu} - 1)/b^2; limits at b=0
        small = np.abs(b) < 1e-6
        bs = np.where(small, 1.0, b)
        e = np.exp(bs * lu)
        f = np.where(small, lu + b * lu**2 / 2, np.expm1(bs * lu) / bs)
        g = np.where(small, lu**2 / 2 + b * lu**3 / 3, lu * e / bs - np.expm1(bs * lu) / bs**2)
        return f, g

    f1, g1 = prim(l1)
    f0, g0 = prim(l0)
    return f1 - f0, g1 - g0


def check_vllm_loadable(path: str) -> None:
    """Fail clearly on a local folder vLLM would load into garbage, instead of sampling noise.

    vLLM picks the model class from config.json's `architectures` and, with tied embeddings,
    reads the shared matrix under `model.embed_tokens.weight`. A folder written by
    `safetensors.torch.save_model` (not `save_pretrained`) may lack both; vLLM then runs an
    untied, zero embedding and every token comes out uniform."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return  # a hub id, or something vLLM will judge itself
    config = json.loads(config_file.read_text())
    problems = []
    if not config.get("architectures"):
        problems.append("config.json names no `architectures`")
    if config.get("tie_word_embeddings"):
        names = _checkpoint_names(folder)
        if names and not any(n.endswith("embed_tokens.weight") for n in names):
            problems.append("tied embeddings but the checkpoint has no `embed_tokens.weight`")
    if problems:
        raise ValueError(
            f"{path}: vLLM cannot load this folder correctly ({'; '.join(problems)}). Re-save it "
            f"with transformers: AutoModelForCausalLM.from_pretrained(p).save_pretrained(new_folder)"
        )


def _checkpoint_names(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    single = folder / "model.safetensors"
    if not single.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(single), "np") as handle:
        return list(handle.keys())
