"""Which cached tokens a decode step attends to: ``Dense``, ``StreamingLLM`` and ``Quest``.

A policy turns the state of one layer's cache (:class:`~sparseforge.attention.cache.PagedLayer`) and
the step's query into **token spans** per KV head, int32 ``(B, Hkv, S, 2)`` of ``[start, length)``,
ascending and disjoint (length 0 = unused slot), which the native decode-attention kernel
(:func:`sparseforge.ops.decode_attention.decode_attention`) reads and nothing else. Prefill (more
than one query token) is always dense. Policies are frozen dataclasses, validated at construction.

* :class:`Dense`: every cached token (the baseline; equals torch SDPA).
* :class:`StreamingLLM`: the first ``sinks`` tokens and the last ``window`` tokens
  (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).
  Keys stay as transformers cached them (rotated at their text positions) and are never
  re-rotated; the middle is skipped, not evicted (it bounds the bytes read per step, not the memory
  held). ``positions="text"`` scores the sinks at their true distance; ``positions="cache"`` gives
  the paper's cache positions (sinks at distance ``sinks + window - 1 - i``) by rotating the query,
  not the keys. Window tokens are at the same distance either way.
* :class:`SnapKV`: once, at the end of the prompt, the last ``window`` prompt queries vote (softmax
  probabilities summed over the window, pooled over neighbouring tokens) and each KV head keeps
  the ``capacity - window`` prompt tokens with the most votes plus the window; every generated
  token is kept (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024;
  FasterDecoding/SnapKV ``snapkv_utils.py``). The reference votes per query head on repeated KV
  heads; here the votes are summed over each KV head's query group so one set is kept per KV
  head. Prompts shorter than ``capacity`` stay dense (as the reference). Like StreamingLLM it
  bounds the reads, not the memory: the skipped tokens stay in the cache.
* :class:`Mustafar`: every token older than the ``recent`` window keeps only its largest-magnitude
  key and value channels (70% pruned by default), compressed in 256-token chunks as in the
  reference (Joo et al., "Mustafar: Promoting Unstructured Sparsity for KV Cache Pruning in LLM
  Inference", 2025; dhjoo98/mustafar): the compressed tokens go through the compressed-KV kernel, the
  recent ones through the dense kernel, merged by log-sum-exp. Every token is attended (the bytes
  shrink, not the token count). The dense copy stays in the cache (other attention implementations
  read it), so memory is not reduced yet.
* :class:`Quest`: per KV head, the ``budget // page_size`` pages with the largest upper bound on
  ``q . k`` (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
  ICML 2024; mit-han-lab/Quest). The bound of a page is ``sum_d max(q_d max_d, q_d min_d)`` from the
  page's per-channel key minimum and maximum; for grouped-query attention it is summed over the
  query heads of the group, so each page is read once per KV head (the reference code selects per
  query head after ``repeat_kv``). As the Quest kernels do, the newest (partial) page is always read
  and the budget counts it; the first ``dense_layers`` (2) layers and prefill stay dense, and a
  budget at least the context length is dense.
* :class:`DoubleSparsity`: per KV head, the ``budget`` tokens with the largest approximate score
  ``q[label] . k[label]`` on ``channels`` label channels found offline
  (:func:`~sparseforge.attention.double_sparsity.calibrate_label_channels`), summed over the GQA
  group so each token is read once (Yang et al., "Post-Training Sparse Attention with Double
  Sparsity", 2024; andy-yang-1/DoubleSparse). The label keys are kept in a small side cache
  (``channels`` values per token); every layer is sparse at decode, prefill is dense.

Example:
    >>> from sparseforge.attention import Quest
    >>> Quest(budget=2048).pages()
    128
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from sparseforge.errors import ConfigError
from sparseforge.attention.memory import huge_page_empty
from sparseforge.ops.decode_attention import select_pages
from sparseforge.ops.quest_attention import attend_quest

__all__ = ["Policy", "Dense", "StreamingLLM", "Quest", "SnapKV", "Mustafar", "DoubleSparsity", "dense_spans"]


def dense_spans(batch: int, kv_heads: int, n: int) -> Tensor:
    """int32 ``(B, Hkv, 1, 2)``: one span ``[0, n)`` per KV head."""
    spans = torch.empty(batch, kv_heads, 1, 2, dtype=torch.int32)
    spans[..., 0] = 0
    spans[..., 1] = n
    return spans


def _appended(old: Optional[Tensor], new: Tensor) -> Tensor:
    """``old`` (or nothing) followed by ``new`` along the token dimension 2, in a buffer advised for
    transparent huge pages (a decode step streams it whole: 4 KB pages cost a TLB miss each)."""
    parts = [new] if old is None else [old, new]
    shape = (*new.shape[:2], sum(p.shape[2] for p in parts), *new.shape[3:])
    return torch.cat(parts, dim=2, out=huge_page_empty(shape, new.dtype))


def _positive(name: str, value, owner: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")


class Policy:
    """Base class: ``spans(layer, query, layer_idx)`` -> int32 ``(B, Hkv, S, 2)`` token spans.

    ``layer`` is the layer's :class:`~sparseforge.attention.cache.PagedLayer` after this step's
    token was appended (``layer.n`` tokens); ``query`` float32 ``(B, Hq, D)``, rotated.
    ``observe_prefill(layer, query, scale)`` sees every prefill's rotated queries ``(B, Hq, T, D)``
    after their keys were cached (default: nothing); state goes in ``layer.policy_state``.
    """

    def observe_prefill(self, layer, query: Tensor, scale: float) -> None:
        """Called by the attention after a prefill chunk of more than one token."""

    def decode(self, layer, query: Tensor, spans: Tensor, scale: float) -> Optional[Tensor]:
        """The step's attention ``(B, Hq, D)`` if the policy computes it itself, else ``None`` (the
        dense kernel over ``spans`` then runs)."""
        return None

    def fused_step(self, layer, query: Tensor, layer_idx: int, scale: float) -> Optional[tuple[Tensor, int]]:
        """``(attention (B, Hq, D), tokens read over the batch and KV heads)`` when the policy selects and
        attends in one native call, else ``None`` (then ``spans`` and ``decode`` run). Called only when
        no padding mask or sliding window clips the step."""
        return None

    def prefill(self, module, layer, query: Tensor, attention_mask: Optional[Tensor], scale: float,
                **kwargs) -> Optional[Tensor]:
        """A prefill chunk's attention ``(B, T, Hq, D)`` if the policy computes it itself (after the
        chunk's keys were cached in ``layer``), else ``None`` (transformers' SDPA then runs)."""
        return None

    def state_bytes(self, layer) -> int:
        """Bytes the policy holds in ``layer.policy_state`` besides the cache's rows (default: 0)."""
        return 0

    def decoding(self) -> "Policy":
        """The policy that runs the decode steps (itself; a prefill-only policy names another)."""
        return self

    def check_page_size(self, page_size: int) -> None:
        """Raises :class:`ConfigError` if the policy cannot run on pages of ``page_size`` tokens."""

    def spans(self, layer, query: Tensor, layer_idx: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Dense(Policy):
    """Attend to every cached token (the baseline)."""

    def spans(self, layer, query: Tensor, layer_idx: int) -> Tensor:
        return dense_spans(layer.batch, layer.kv_heads, layer.n)


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """The first ``sinks`` tokens plus the most recent ``window`` tokens (the current one included).

    ``positions``: ``"text"`` (default) scores every token at its text position, as cached;
    ``"cache"`` scores the sinks as the paper does, with the query moved to its position inside
    the cache (``sinks + window - 1``): the sink part runs with the query rotated back by the number of
    skipped tokens and is merged with the window part (window tokens are at the same distance either
    way). ``"cache"`` needs fixed RoPE frequencies and an unpadded batch.

    Example:
        >>> StreamingLLM(sinks=4, window=1020)
        StreamingLLM(sinks=4, window=1020, positions='text')
    """

    sinks: int = 4
    window: int = 1020
    positions: str = "text"

    def __post_init__(self):
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise ConfigError(f"StreamingLLM: sinks must be an integer >= 0, got {self.sinks!r}")
        _positive("window", self.window, "StreamingLLM")
        if self.positions not in ("text", "cache"):
            raise ConfigError(f"StreamingLLM: positions must be 'text' or 'cache', got {self.positions!r}")

    def skipped(self, n: int) -> int:
        """Tokens between the sinks and the window at context length ``n``."""
        return max(0, n - self.sinks - self.window)

    def spans(self, layer, query: Tensor, layer_idx: int) -> Tensor:
        n = layer.n
        if not self.skipped(n):
            return dense_spans(layer.batch, layer.kv_heads, n)
        spans = torch.empty(layer.batch, layer.kv_heads, 2, 2, dtype=torch.int32)
        spans[..., 0, 0] = 0
        spans[..., 0, 1] = self.sinks
        spans[..., 1, 0] = n - self.window
        spans[..., 1, 1] = self.window
        return spans


@dataclass(frozen=True)
class Quest(Policy):
    """Query-aware page selection: ``budget`` tokens = ``budget // page_size`` pages per KV head.

    ``page_size``: ``None`` takes the cache's; if given it must equal the cache's. ``budget`` must
    be a multiple of the page size. ``dense_layers``: the first layers attend densely (Quest: 2).

    Example:
        >>> Quest(budget=64, page_size=16).pages()
        4
    """

    budget: int = 2048
    page_size: Optional[int] = None
    dense_layers: int = 2

    def __post_init__(self):
        _positive("budget", self.budget, "Quest")
        if self.page_size is not None:
            _positive("page_size", self.page_size, "Quest")
            self._check_fit(self.page_size)
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ConfigError(f"Quest: dense_layers must be an integer >= 0, got {self.dense_layers!r}")

    def _check_fit(self, page_size: int) -> None:
        if self.budget % page_size:
            raise ConfigError(
                f"Quest: budget {self.budget} is not a multiple of the page size {page_size}; use "
                f"{max(page_size, self.budget // page_size * page_size)} (whole pages are read)"
            )

    def check_page_size(self, page_size: int) -> None:
        if self.page_size is not None and self.page_size != page_size:
            raise ConfigError(
                f"Quest(page_size={self.page_size}) does not match the cache's page_size={page_size}; "
                "leave Quest's page_size unset or make them equal"
            )
        self._check_fit(page_size)

    def pages(self, page_size: int = 16) -> int:
        """Pages read per KV head and step (the newest page included)."""
        return self.budget // (self.page_size or page_size)

    def spans(self, layer, query: Tensor, layer_idx: int) -> Tensor:
        n, P = layer.n, layer.page_size
        if layer_idx < self.dense_layers or n <= self.budget:
            return dense_spans(layer.batch, layer.kv_heads, n)
        npages = (n + P - 1) // P
        k = self.budget // P  # pages read, the newest included
        full = npages - 1  # candidate pages (all but the newest)
        B, Hkv = layer.batch, layer.kv_heads
        top = select_pages(query, layer.kmin, layer.kmax, full, k - 1)  # (B, Hkv, k - 1) ascending
        spans = torch.empty(B, Hkv, k, 2, dtype=torch.int32)
        spans[..., : k - 1, 0] = top * P
        spans[..., : k - 1, 1] = P
        spans[..., k - 1, 0] = full * P
        spans[..., k - 1, 1] = n - full * P
        return spans

    def fused_step(self, layer, query: Tensor, layer_idx: int, scale: float) -> Optional[tuple[Tensor, int]]:
        """The sparse steps in one native call (``sparseforge::quest_attention``: the same pages as
        :meth:`spans`, scored, selected and attended per KV head without Python in between)."""
        n, P = layer.n, layer.page_size
        if layer_idx < self.dense_layers or n <= self.budget:
            return None
        k = self.budget // P
        out = attend_quest(query, layer.k_store, layer.v_store, layer.kmin, layer.kmax, n, P, k, scale)
        full = (n + P - 1) // P - 1
        return out, layer.batch * layer.kv_heads * ((k - 1) * P + n - full * P)



@dataclass(frozen=True)
class SnapKV(Policy):
    """Prompt tokens chosen once by the last ``window`` prompt queries; ``capacity`` prompt tokens read.

    ``pooling``: ``"avgpool"`` (the reference's default) or ``"maxpool"`` over ``kernel`` neighbours.

    Example:
        >>> SnapKV(window=32, capacity=2048)
        SnapKV(window=32, capacity=2048, kernel=5, pooling='avgpool')
    """

    window: int = 32
    capacity: int = 2048
    kernel: int = 5
    pooling: str = "avgpool"

    def __post_init__(self):
        _positive("window", self.window, "SnapKV")
        _positive("capacity", self.capacity, "SnapKV")
        _positive("kernel", self.kernel, "SnapKV")
        if self.capacity <= self.window:
            raise ConfigError(f"SnapKV: capacity ({self.capacity}) must exceed the observation window ({self.window})")
        if self.kernel % 2 == 0:
            raise ConfigError(f"SnapKV: kernel must be odd (the pooling keeps the length), got {self.kernel}")
        if self.pooling not in ("avgpool", "maxpool"):
            raise ConfigError(f"SnapKV: pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")

    def observe_prefill(self, layer, query: Tensor, scale: float) -> None:
        T = query.shape[2]
        if layer.n != T or T < self.capacity:  # a later chunk, or a prompt within capacity: nothing to drop
            return
        B, Hq, _, D = query.shape
        Hkv, w = layer.kv_heads, self.window
        keys = layer.keys.float()  # (B, Hkv, T, D)
        q = query[:, :, T - w:].float().reshape(B, Hkv, Hq // Hkv, w, D)  # the observation window per group
        scores = torch.einsum("bhgqd,bhtd->bhgqt", q, keys) * scale  # (B, Hkv, G, w, T)
        causal = torch.ones(w, w, dtype=torch.bool).triu(1)  # query i of the window sees window keys <= i
        scores[..., T - w:] = scores[..., T - w:].masked_fill(causal, float("-inf"))
        votes = scores.softmax(-1)[..., : T - w].sum(3).sum(2)  # (B, Hkv, T - w): summed over window and group
        pool = torch.nn.functional.avg_pool1d if self.pooling == "avgpool" else torch.nn.functional.max_pool1d
        votes = pool(votes, kernel_size=self.kernel, padding=self.kernel // 2, stride=1)
        keep = votes.topk(self.capacity - w, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, C - w)
        layer.policy_state["snapkv"] = (T, keep.to(torch.int32))

    def spans(self, layer, query: Tensor, layer_idx: int) -> Tensor:
        state = layer.policy_state.get("snapkv")
        if state is None:
            return dense_spans(layer.batch, layer.kv_heads, layer.n)
        T, keep = state  # prompt length, (B, Hkv, C - w) kept prompt tokens
        B, Hkv, kept = keep.shape
        spans = torch.empty(B, Hkv, kept + 1, 2, dtype=torch.int32)
        spans[..., :kept, 0] = keep
        spans[..., :kept, 1] = 1
        spans[..., kept, 0] = T - self.window  # the window and every generated token
        spans[..., kept, 1] = layer.n - (T - self.window)
        return spans


@dataclass(frozen=True)
class Mustafar(Policy):
    """Per-token magnitude pruning of keys and values beyond the ``recent`` window, compressed.

    ``sparsity``: of the keys (and of the values unless ``value_sparsity`` is given), in [0, 1); a
    token keeps ``D - int(sparsity * D) + 1`` channels (the reference's ``kthvalue`` threshold).
    ``recent``: tokens kept dense (the reference's ``residual_length``); older ones are compressed
    256 at a time. ``release_dense``: free the dense rows of compressed tokens (KV memory: the
    compressed format plus the recent window; the cache then takes single-token decode steps of the
    ``"sparseforge"`` attention only, see :meth:`PagedLayer.release_dense`).

    Example:
        >>> Mustafar(sparsity=0.7).keep(128)
        (40, 40)
    """

    sparsity: float = 0.7
    recent: int = 256
    value_sparsity: Optional[float] = None
    release_dense: bool = False
    CHUNK = 256  # tokens compressed at a time (the reference's)

    def __post_init__(self):
        for name in ("sparsity", "value_sparsity"):
            value = getattr(self, name)
            if name == "value_sparsity" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ConfigError(f"Mustafar: {name} must be in [0, 1), got {value!r}")
        _positive("recent", self.recent, "Mustafar")
        if not isinstance(self.release_dense, bool):
            raise ConfigError(f"Mustafar: release_dense must be True or False, got {self.release_dense!r}")

    def state_bytes(self, layer) -> int:
        state = layer.policy_state.get("mustafar", {})
        return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))

    def keep(self, dim: int) -> tuple[int, int]:
        """Channels a key and a value keep at head dimension ``dim``."""
        from sparseforge.ops.sparse_kv import keep_for

        vs = self.sparsity if self.value_sparsity is None else self.value_sparsity
        return keep_for(self.sparsity, dim), keep_for(vs, dim)

    def _compress(self, layer) -> int:
        """Compress whole chunks older than the recent window; returns the compressed token count."""
        from sparseforge.ops.sparse_kv import compress_tokens

        state = layer.policy_state.get("mustafar")
        if state is None:
            state = layer.policy_state["mustafar"] = {"done": 0}
        # tokens from the lowest crop since the last look on may have been replaced, and the recent
        # window stays dense: drop the chunks past either
        valid = max(0, min(layer.n - self.recent, layer.policy_state.pop("cropped_to", layer.n)))
        valid = max(valid // self.CHUNK * self.CHUNK, layer.released)  # freed rows cannot be recompressed
        if state["done"] > valid:
            for key in ("kvals", "kbits", "vvals", "vbits"):
                if key in state:
                    state[key] = state[key][:, :, :valid].contiguous()
            state["done"] = valid
        done = state["done"]
        upto = done + (layer.n - self.recent - done) // self.CHUNK * self.CHUNK  # whole chunks old enough
        if upto > done:  # one compression and one append for all of them (a prefill may bring many)
            sl = slice(done, upto)
            kk, kv = self.keep(layer.head_dim)
            parts = {"k": compress_tokens(layer.k_store[:, :, sl], kk), "v": compress_tokens(layer.v_store[:, :, sl], kv)}
            for name, (vals, bits) in parts.items():
                for suffix, t in (("vals", vals), ("bits", bits)):
                    key = f"{name}{suffix}"
                    state[key] = _appended(state.get(key), t)
            done = upto
        state["done"] = done
        if self.release_dense and done > layer.released:
            layer.release_dense(done)
        return done

    def observe_prefill(self, layer, query: Tensor, scale: float) -> None:
        self._compress(layer)

    def spans(self, layer, query: Tensor, layer_idx: int) -> Tensor:
        return dense_spans(layer.batch, layer.kv_heads, layer.n)

    def decode(self, layer, query: Tensor, spans: Tensor, scale: float) -> Optional[Tensor]:
        from sparseforge.ops.sparse_kv import attend_compressed

        done = self._compress(layer)
        if not done:
            return None
        st = layer.policy_state["mustafar"]
        if st["kvals"].shape[3] != st["vvals"].shape[3]:
            raise ConfigError("Mustafar: the compressed-KV kernel needs the same keep count for keys and values; "
                              "leave value_sparsity unset or equal to sparsity")
        # one native call: the compressed tokens [0, done) and the dense recent ones [done, n) in one softmax
        out, _ = attend_compressed(query, st["kvals"], st["kbits"], st["vvals"], st["vbits"], done, scale,
                                   layer.k_store, layer.v_store, layer.n)
        return out


@dataclass(frozen=True)
class DoubleSparsity(Policy):
    """The ``budget`` tokens with the largest label-channel scores, per KV head.

    ``channels``: label channels per head (the first ``channels`` of ``labels``); ``labels``: int
    ``(layers, kv_heads, >= channels)`` channel indices, most important first, or the path of a
    file written by :func:`~sparseforge.attention.double_sparsity.save_label_channels`. Required:
    the channels come from an offline calibration of the model. ``label_bits``: 4 (the paper's label
    cache: per-token symmetric 4-bit codes, :class:`~sparseforge.attention.double_sparsity.PackedLabels`,
    scored and selected by the native kernel ``sparseforge::label_select``) or 16 (the label
    channels kept in the cache's dtype, scored with torch).

    Example:
        >>> import torch
        >>> DoubleSparsity(channels=2, budget=64, labels=torch.tensor([[[0, 3]]]))
        DoubleSparsity(channels=2, budget=64, label_bits=4)
    """

    channels: int = 16
    budget: int = 2048
    labels: Union[Tensor, str, os.PathLike, None] = field(default=None, compare=False, repr=False)
    label_bits: int = 4

    def __post_init__(self):
        from sparseforge.attention.double_sparsity import check_label_channels, load_label_channels

        _positive("channels", self.channels, "DoubleSparsity")
        _positive("budget", self.budget, "DoubleSparsity")
        if self.label_bits not in (4, 16):
            raise ConfigError(f"DoubleSparsity: label_bits must be 4 (the packed label cache) or 16 (the cache's dtype), "
                              f"got {self.label_bits!r}")
        if self.labels is None:
            raise ConfigError(
                "DoubleSparsity needs calibrated label channels: labels=calibrate_label_channels(model, batches, "
                f"channels={self.channels}) or the path of a file saved by save_label_channels"
            )
        labels = self.labels
        if isinstance(labels, (str, os.PathLike)):
            labels = load_label_channels(labels)
        object.__setattr__(self, "labels", check_label_channels(labels, self.channels)[:, :, : self.channels].contiguous())

    def _label_keys(self, layer, layer_idx: int):
        """The label channels of every cached key, appended as tokens arrive: ``(B, Hkv, n, channels)``
        in the cache's dtype (``label_bits=16``), or the layer's :class:`PackedLabels` (4)."""
        from sparseforge.attention.double_sparsity import PackedLabels

        L, Hkv, _ = self.labels.shape
        if layer_idx >= L or Hkv != layer.kv_heads or int(self.labels.max()) >= layer.head_dim:
            raise ConfigError(
                f"DoubleSparsity: labels for {L} layers x {Hkv} KV heads (channels < {int(self.labels.max()) + 1}) do not "
                f"fit layer {layer_idx} with {layer.kv_heads} KV heads of dimension {layer.head_dim}; calibrate on this model"
            )
        state = layer.policy_state.get("double_sparsity")
        if state is None or state["batch"] != layer.batch or state["bits"] != self.label_bits:
            keys = layer.k_store[:, :, :0, : self.channels].clone() if self.label_bits == 16 else \
                PackedLabels(layer.batch, Hkv, self.channels)
            state = layer.policy_state["double_sparsity"] = {"keys": keys, "batch": layer.batch, "bits": self.label_bits}
        held = state["keys"].shape[2] if self.label_bits == 16 else state["keys"].n
        have = min(held, layer.n, layer.policy_state.pop("cropped_to", layer.n))  # stale past a crop
        index = self.labels[layer_idx].view(1, Hkv, 1, -1).expand(layer.batch, Hkv, layer.n - have, -1)
        new = layer.k_store[:, :, have: layer.n].gather(-1, index)  # (B, Hkv, n - have, channels)
        if self.label_bits == 16:
            state["keys"] = torch.cat([state["keys"][:, :, :have], new], dim=2)
        else:
            state["keys"].write(new, have)
        return state["keys"]

    def _query_labels(self, query: Tensor, layer, layer_idx: int) -> Tensor:
        """float32 ``(B, Hkv, channels)``: the label channels of the group's queries, summed (scores are linear)."""
        B, Hq, D = query.shape
        Hkv = layer.kv_heads
        q = query.float().view(B, Hkv, Hq // Hkv, D).sum(2)  # (B, Hkv, D)
        return q.gather(-1, self.labels[layer_idx].unsqueeze(0).expand(B, -1, -1)).contiguous()

    def scores(self, layer, query: Tensor, layer_idx: int) -> Tensor:
        """float32 ``(B, Hkv, n)``: ``sum_{g in group} q_g[label] . k[label]`` per cached token (the
        keys' label channels dequantized from 4 bits with ``label_bits=4``)."""
        from sparseforge.ops.label_select import label_scores

        keys = self._label_keys(layer, layer_idx)
        q_label = self._query_labels(query, layer, layer_idx)
        if self.label_bits == 4:
            return label_scores(q_label, keys.codes, keys.scales, layer.n)
        return torch.einsum("bhc,bhtc->bht", q_label, keys.float())

    def spans(self, layer, query: Tensor, layer_idx: int) -> Tensor:
        from sparseforge.ops.label_select import label_select

        n = layer.n
        if n <= self.budget:
            self._label_keys(layer, layer_idx)  # keep the label cache in step
            return dense_spans(layer.batch, layer.kv_heads, n)
        if self.label_bits == 4:
            keys = self._label_keys(layer, layer_idx)
            top = label_select(self._query_labels(query, layer, layer_idx), keys.codes, keys.scales, n, self.budget)
        else:
            top = self.scores(layer, query, layer_idx).topk(self.budget, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, budget)
        spans = torch.empty(layer.batch, layer.kv_heads, self.budget, 2, dtype=torch.int32)
        spans[..., 0] = top
        spans[..., 1] = 1
        return spans

    def decode(self, layer, query: Tensor, spans: Tensor, scale: float) -> Optional[Tensor]:
        """The chosen tokens' keys and values gathered contiguous (native copy), then the dense kernel
        over them: one stream of ``budget`` rows instead of ``budget`` one-token spans. ``None`` (the
        kernel over the spans as given) when the budget covers the context or spans were clipped
        (a padded batch, a sliding window below the cache)."""
        from sparseforge.ops.decode_attention import attend
        from sparseforge.ops.label_select import gather_tokens

        if spans.shape[2] != self.budget or self.budget >= layer.n or not bool((spans[..., 1] == 1).all()):
            return None
        idx = spans[..., 0].contiguous()  # (B, Hkv, budget) int32, ascending
        k, v = gather_tokens(layer.k_store, idx), gather_tokens(layer.v_store, idx)  # (B, Hkv, budget, D)
        return attend(query, k, v, dense_spans(layer.batch, layer.kv_heads, self.budget), self.budget, scale)

    def label_bytes(self, layer) -> int:
        """Bytes of the label cache one decode step reads in ``layer`` (every cached token's labels)."""
        per_token = self.channels // 2 + self.channels % 2 + 4 if self.label_bits == 4 else \
            self.channels * layer.k_store.element_size()
        return layer.batch * layer.kv_heads * layer.n * per_token
