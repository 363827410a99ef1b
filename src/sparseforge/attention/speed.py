"""Decode speed of a model at a given context under each policy, without running the prefill.

:func:`decode_speed` fills a :class:`~sparseforge.attention.cache.PagedKVCache` with ``context``
random tokens per layer (keys and values drawn from a unit normal: speed does not depend on their
values, only on how many are read), then times single-token forward passes of the model with
``attn_implementation="sparseforge"``, the policies taking turns step by step (so load on the
machine hits them alike; the cache is cropped back after each step). Reported per policy: median
tokens/s, the read fraction (tokens attended / tokens cached) and the KV bytes held.

Example:
    >>> import sys; sys.path.insert(0, "tests")  # doctest: +SKIP
    >>> from tiny_models import tiny_model  # doctest: +SKIP
    >>> from sparseforge.attention import Dense, Quest
    >>> r = decode_speed(tiny_model("llama"), 512, {"dense": Dense(), "quest": Quest(budget=64)}, steps=2)  # doctest: +SKIP
    >>> r["quest"]["read_fraction"] < r["dense"]["read_fraction"] == 1.0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import statistics
import time

import torch

from sparseforge.attention.cache import PagedKVCache
from sparseforge.attention.interface import enable
from sparseforge.attention.policies import Dense, Mustafar, Policy, Quest, StreamingLLM
from sparseforge.errors import ConfigError, ModelError

__all__ = ["decode_speed", "kv_bench", "kv_policy", "kv_table", "KV_POLICIES"]

KV_POLICIES = ("dense", "quest", "streaming", "mustafar")


def decode_speed(model, context: int, policies: dict[str, Policy], steps: int = 5, seed: int = 0,
                 page_size: int = 16) -> dict[str, dict]:
    """``{name: {"tokens_per_s", "read_fraction", "kv_bytes"}}`` for each policy (see the module doc)."""
    if not isinstance(context, int) or context < 1 or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"decode_speed needs context >= 1 and steps >= 1, got context={context!r} steps={steps!r}")
    if not policies:
        raise ConfigError("decode_speed needs at least one policy")
    config = model.config.get_text_config(decoder=True)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(model.parameters()).dtype
    model.set_attn_implementation(enable())
    cache = PagedKVCache(model.config, max_cache_len=context + 1, page_size=page_size)
    g = torch.Generator().manual_seed(seed)
    for i in range(len(cache.layers)):
        for t0 in range(0, context, 4096):  # (1, Hkv, T, D) chunks: no second full-size temporary
            t = min(4096, context - t0)
            kv = [torch.randn(1, kv_heads, t, head_dim, generator=g).to(dtype) for _ in range(2)]
            cache.update(kv[0], kv[1], i)
    token, position = torch.tensor([[1]]), torch.tensor([[context]])
    samples: dict[str, list[float]] = {name: [] for name in policies}
    read: dict[str, list[int]] = {name: [0, 0] for name in policies}
    with torch.no_grad():
        for step in range(steps + 1):  # round 0 warms up
            for name, policy in policies.items():
                cache.set_policy(policy)
                before = [(layer.tokens_read, layer.tokens_cached) for layer in cache.layers]
                t0 = time.perf_counter()
                model(input_ids=token, position_ids=position, cache=cache, use_cache=True)
                elapsed = time.perf_counter() - t0
                cache.crop(-1)
                if step:
                    samples[name].append(elapsed)
                    read[name][0] += sum(layer.tokens_read - r for layer, (r, _) in zip(cache.layers, before))
                    read[name][1] += sum(layer.tokens_cached - c for layer, (_, c) in zip(cache.layers, before))
    return {
        name: {"tokens_per_s": 1.0 / statistics.median(samples[name]), "read_fraction": read[name][0] / read[name][1],
               "kv_bytes": cache.kv_bytes()}
        for name in policies
    }


def kv_policy(name: str, budget: int) -> Policy:
    """The policy ``name`` (one of :data:`KV_POLICIES`) reading about ``budget`` tokens per step:
    Quest's ``budget``, StreamingLLM's 4 sinks + ``budget - 4`` window, Mustafar's ``budget`` recent
    tokens dense (70% pruned beyond)."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"--kv-budget must be a positive integer, got {budget!r}")
    if name == "dense":
        return Dense()
    if name == "quest":
        return Quest(budget=budget)
    if name == "streaming":
        if budget <= 4:
            raise ConfigError(f"--kv-budget {budget} leaves no window after StreamingLLM's 4 sinks; use at least 5")
        return StreamingLLM(sinks=4, window=budget - 4)
    if name == "mustafar":
        return Mustafar(recent=budget)
    raise ConfigError(f"unknown KV policy {name!r}; choose one of {', '.join(KV_POLICIES)}")


def kv_bench(model: str, context: int, policy: str, budget: int, steps: int = 3) -> dict[str, dict]:
    """``sparseforge bench MODEL --kv-policy P``: :func:`decode_speed` of the dense policy and ``policy``
    at ``context`` tokens on the model ``model`` ('builtin' or a causal-LM directory)."""
    from sparseforge.io.models import load_model

    chosen = kv_policy(policy, budget)
    net = load_model(model).model
    if not hasattr(net, "generate") or not net.can_generate():
        raise ModelError(f"{model} is not a causal language model; --kv-policy measures decode steps")
    policies = {"dense": Dense()} if policy == "dense" else {"dense": Dense(), policy: chosen}
    return decode_speed(net, context, policies, steps=steps)


def kv_table(results: dict[str, dict], context: int) -> str:
    """A text table of :func:`kv_bench`'s results."""
    dense = results["dense"]["tokens_per_s"]
    lines = [f"decode at {context} cached tokens", f"{'policy':<10} {'tokens/s':>10} {'vs dense':>9} {'read fraction':>14} {'KV MiB':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<10} {r['tokens_per_s']:>10.2f} {r['tokens_per_s'] / dense:>8.2f}x {r['read_fraction']:>14.4f} "
                     f"{r['kv_bytes'] / 2**20:>9.1f}")
    return "\n".join(lines)
