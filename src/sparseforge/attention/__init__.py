"""Sparse decode attention and a paged KV cache for transformers models on the CPU.

* :class:`PagedKVCache`: a transformers ``Cache`` (paged, float32/bfloat16, per-page key min/max)
  carrying a policy: :class:`Dense`, :class:`StreamingLLM`, :class:`Quest`, :class:`SnapKV`,
  :class:`Mustafar`, :class:`DoubleSparsity` (label channels from :func:`calibrate_label_channels`).
* :class:`TriangleMix`: sparse prefill (dense shallow layers, the Triangle pattern in deep layers)
  by the native block-sparse prefill kernel (``sparseforge::prefill_attention``).
* :func:`enable`: registers ``attn_implementation="sparseforge"`` with transformers'
  ``AttentionInterface``; decode steps then run the native kernel
  (``sparseforge::decode_attention``) over the tokens the policy selects.

Importing this package imports transformers (``import sparseforge`` does not).

Example:
    >>> import torch
    >>> from sparseforge.attention import PagedKVCache, Quest, enable
    >>> from tests.tiny_models import tiny_llama  # doctest: +SKIP
    >>> model = tiny_llama()  # doctest: +SKIP
    >>> model.set_attn_implementation(enable())  # doctest: +SKIP
    >>> cache = PagedKVCache(model.config, policy=Quest(budget=256))  # doctest: +SKIP
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)  # doctest: +SKIP

See docs/attention.md.
"""

from sparseforge.attention.cache import PagedKVCache, PagedLayer
from sparseforge.attention.interface import NAME, enable, sparseforge_attention
from sparseforge.attention.double_sparsity import calibrate_label_channels, load_label_channels, save_label_channels
from sparseforge.attention.policies import Dense, DoubleSparsity, Mustafar, Policy, Quest, SnapKV, StreamingLLM
from sparseforge.attention.trianglemix import TriangleMix

__all__ = ["PagedKVCache", "PagedLayer", "Policy", "Dense", "StreamingLLM", "Quest", "SnapKV", "Mustafar", "DoubleSparsity",
           "calibrate_label_channels", "save_label_channels", "load_label_channels", "enable", "sparseforge_attention", "NAME",
           "TriangleMix"]
