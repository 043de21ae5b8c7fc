"""Decoding one token at a time on fixed-size buffers, eagerly or replayed as a CUDA graph.

At batch 1 a decoding step of either language model is a few hundred small kernels, each launched
from Python: the GPU finishes each one long before the CPU has issued the next, so the launch time,
not the model, sets the speed. A CUDA graph records the kernels of one step once and replays them
with a single launch. A graph replays fixed shapes at fixed addresses, so every tensor a step reads
or writes must live in a buffer allocated once, and anything that changes from step to step must
be a value in device memory, never a Python number or a shape:

- the input token and the logits: static buffers, copied into and read from;
- Megalodon's state (:class:`MegalodonDecoder`): the timestep norms' running statistics and the
  CEMA hidden states, updated in place, and the keys and values of the unfinished chunk in buffers
  of ``chunk_size`` slots. The position inside the chunk is a device integer ``pos``: the new key
  goes to slot ``pos``, attention masks slots after it, and ``pos`` wraps to 0 when the chunk
  fills (the streaming cache of :class:`~megalodon_lite.attention.ChunkKVCache` empties there:
  slots left over from the previous chunk are masked, never read);
- the baseline's KV cache (:class:`LlamaDecoder`): buffers for the whole stream (prompt and
  continuation), the RoPE position read from a device integer. Attention over the full buffer
  would cost as much at the first token as at the last, so the step attends over a *span* of the
  buffer: the smallest of 16, 20, 24, 28, 32, 40, ... (four per octave, at most 25% longer than
  needed) that holds the tokens so far, capped at the buffer's size, with one graph per span.

Both decoders run the same step code eagerly (``cuda_graph=False``: on a CPU, or to compare) or
captured (``cuda_graph=True``, CUDA only). The step is the models' own computation on one token,
written with the chapters' functions (``timestep_norm``, ``cema_recurrence``, ``normalized_qk``,
``RotaryEmbedding``, the norms) over the buffers; ``tests/test_decoding.py`` checks it token by
token against ``model(token, state)``. Under autocast (bf16 on CUDA, as the commands decode) the
linear layers' weights are cast once, when the decoder is built, instead of at every step (what
autocast does with an already cast weight is nothing, so the numbers are autocast's).

``generate`` of both models and ``train.stream_generate`` use this module on CUDA unless told
``cuda_graph=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_lite import validate
from megalodon_lite.attention import activation_dtype, normalized_qk
from megalodon_lite.cema import cema_recurrence
from megalodon_lite.timestep_norm import TimestepNormState, timestep_norm

_LOW_PRECISION = (torch.float16, torch.bfloat16)
FIRST_SPAN = 16
"""The shortest span of the baseline's cache one step attends over (see :func:`attention_span`)."""


def use_cuda_graph(cuda_graph: bool | None, device: torch.device) -> bool:
    """Whether to decode with CUDA graphs: ``None`` means on a CUDA device, ``True`` requires one.

    Raises:
        TypeError: ``cuda_graph`` is not a bool or None.
        ValueError: ``cuda_graph=True`` for a model that is not on a CUDA device.
    """
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None (on CUDA if available), got {cuda_graph!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, and it is on {device}; "
                         "pass cuda_graph=False (or None: graphs only on CUDA)")
    return device.type == "cuda" if cuda_graph is None else cuda_graph


def attention_span(needed: int, capacity: int) -> int:
    """The slots of a cache of ``capacity`` one step attends over when ``needed`` are filled.

    The smallest of FIRST_SPAN, then steps of a quarter of the current power of two (16, 20, 24,
    28, 32, 40, 48, ...) that is >= ``needed``, capped at ``capacity``: at most 25% more than
    needed, and four CUDA graphs per doubling of the context.
    """
    span = FIRST_SPAN
    while span < needed:
        span += (1 << (span.bit_length() - 1)) // 4
    return min(span, capacity)


_FP32_SCORES_FROM_HALF: dict[torch.device, bool] = {}


def _bmm_with_float32_output(device: torch.device) -> bool:
    """Whether ``torch.bmm(a, b, out_dtype=torch.float32)`` takes bf16 inputs on ``device`` (CUDA,
    recent PyTorch): scores in float32 without a float32 copy of the keys."""
    if device not in _FP32_SCORES_FROM_HALF:
        try:  # shaped as the decoders call it: a span of a longer buffer of keys, transposed
            q = torch.randn(2, 1, 8, device=device).to(torch.bfloat16)
            keys = torch.randn(2, 32, 8, device=device).to(torch.bfloat16)[:, :16]
            scores = torch.bmm(q, keys.transpose(1, 2), out_dtype=torch.float32)
            exact = q.float() @ keys.float().transpose(1, 2)
            _FP32_SCORES_FROM_HALF[device] = scores.dtype == torch.float32 and torch.allclose(scores, exact, atol=1e-4)
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_SCORES_FROM_HALF[device] = False
    return _FP32_SCORES_FROM_HALF[device]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """Softmax attention of one query per head over a buffer of keys, some of them masked.

    q (B, H, 1, dk), k (B, H, S, dk), v (B, H, S, dv), visible (S,) bool -> (B, H, 1, dv) in v's
    dtype. Scores and softmax in float32 for half-precision inputs (float64 stays float64), the
    probabilities cast to v's dtype for the product with v, as flash attention does. Masked slots
    get probability exactly 0, so what they hold (an earlier chunk, unwritten memory set to 0)
    never reaches the output. Runs outside autocast: every cast here is explicit.
    """
    batch, heads, _, _ = q.shape
    with torch.autocast(q.device.type, enabled=False):
        if q.dtype in _LOW_PRECISION and q.device.type == "cuda" and _bmm_with_float32_output(q.device):
            scores = torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), out_dtype=torch.float32)
            scores = scores.unflatten(0, (batch, heads))
        else:
            dtype = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
            scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2)
        scores = (scores * scale).masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return probs @ v


@dataclass
class _Autocast:
    """The autocast setting the decoder was built under, re-entered for every step (cache off:
    a graph must not keep casts made during capture)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device: torch.device) -> _Autocast:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=False)


class StaticDecoder:
    """One sequence batch of a language model decoded token by token on fixed-size buffers.

    ``prefill(prompt (B, P))`` reads the prompt through the model's own forward and loads what it
    left (state or cache) into the buffers, returning the logits after the last prompt token (B, V);
    ``step(token (B,))`` feeds one token and returns the next logits (B, V) float32 (float64 for a
    float64 model). The logits of ``step`` are a buffer overwritten by the next step: clone them to
    keep them. With ``cuda_graph=True`` each step is a replayed CUDA graph, captured the first time
    (per span, for the baseline).

    Subclasses define ``_load`` (the prefilled state into the buffers), ``_step`` (one token, on the
    buffers), ``_mutable`` (the buffers a step rewrites wholesale, restored after the warm-up run
    that precedes a capture), ``_graph_key`` and ``_advance``.
    """

    def __init__(self, model: nn.Module, batch_size: int, *, cuda_graph: bool = False) -> None:
        validate.positive_int("batch_size", batch_size)
        if model.training:
            raise ValueError("the decoder runs the model in inference (no dropout): call model.eval() first")
        self.model = model
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.cuda_graph = use_cuda_graph(cuda_graph, self.device)
        self.autocast = _Autocast.current(self.device)
        self.linear_weights = self._cast_linear_weights()
        self.token = torch.zeros(batch_size, 1, dtype=torch.int64, device=self.device)
        self.logits: Tensor | None = None
        self.graphs: dict[object, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.length = 0  # tokens read so far (host copy of what the buffers know)

    def _cast_linear_weights(self) -> dict[nn.Linear, tuple[Tensor, Tensor | None]]:
        """Every linear layer's weight and bias, cast once to the autocast dtype when autocast is on
        for float32 weights (otherwise the layers' own tensors)."""
        dtype = self.autocast.dtype if self.autocast.enabled else None
        weights = {}
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                w, b = module.weight, module.bias
                if dtype is not None and w.dtype == torch.float32:
                    w, b = w.detach().to(dtype), None if b is None else b.detach().to(dtype)
                weights[module] = (w, b)
        return weights

    def linear(self, module: nn.Linear, x: Tensor) -> Tensor:
        """``module(x)`` with the weights cast at construction."""
        weight, bias = self.linear_weights[module]
        return F.linear(x, weight, bias)

    @property
    def extra_weight_bytes(self) -> int:
        """Bytes of the cast copies of the linear weights (0 without autocast)."""
        seen = {}
        for module, (w, b) in self.linear_weights.items():
            for t, own in ((w, module.weight), (b, module.bias)):
                if t is not None and t is not own:
                    seen[t.data_ptr()] = t.nbytes
        return sum(seen.values())

    # ------------------------------------------------------------------ the public loop
    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Read ``prompt`` (B, P) int, P >= 1; return the logits after its last token, (B, V)."""
        validate.tokens(prompt, self.model.config.vocab_size, name="prompt")
        if prompt.shape[0] != self.batch_size:
            raise ValueError(f"prompt has batch size {prompt.shape[0]}, the decoder {self.batch_size}")
        if prompt.device != self.device:
            raise ValueError(f"prompt is on {prompt.device}, the model on {self.device}")
        logits = self._load(prompt)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        if self.logits is None:  # the step's output buffer, allocated once (outside any capture)
            self.logits = torch.empty_like(logits)
        self.length = prompt.shape[1]
        return logits

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed ``token`` (B,) or (B, 1) int; return the logits after it, (B, V) (a buffer: see the class)."""
        if self.length == 0:
            raise RuntimeError("call prefill(prompt) before step(token)")
        if token.numel() != self.batch_size or token.device != self.device:
            raise ValueError(f"token must hold {self.batch_size} ids on {self.device}, got shape "
                             f"{tuple(token.shape)} on {token.device}")
        self._check_room()
        self.token.copy_(token.view(self.batch_size, 1))
        key = self._graph_key()
        if not self.cuda_graph:
            logits = self._run(key)
        else:
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = self._capture(key)
            graph.replay()
            logits = self.logits
        self._advance()
        return logits

    @torch.no_grad()
    def prepare(self, steps: int) -> None:
        """Capture now every graph the next ``steps`` steps will replay (for timing without captures).
        Nothing to do eagerly."""
        validate.non_negative_int("steps", steps)
        if self.length == 0:
            raise RuntimeError("call prefill(prompt) before prepare(steps)")
        if self.cuda_graph:
            for key in dict.fromkeys(self._graph_key(ahead) for ahead in range(steps)):
                if key not in self.graphs:
                    self.graphs[key] = self._capture(key)

    def _run(self, key: object) -> Tensor:
        with self.autocast():
            logits = self._step(key)
        self.logits.copy_(logits)
        return self.logits

    def _capture(self, key: object) -> torch.cuda.CUDAGraph:
        """One warm-up run on a side stream (cuBLAS handles, lazy initialisation: nothing of that
        may happen during capture), the state it changed put back, then the capture (which runs
        nothing). Graphs share one memory pool: they are replayed one at a time, and each leaves
        its results in the decoder's own buffers."""
        saved = [t.clone() for t in self._mutable()]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for buffer, value in zip(self._mutable(), saved):
            buffer.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._run(key)
        if self._pool is None:
            self._pool = graph.pool()
        return graph

    # ------------------------------------------------------------------ per model
    def _load(self, prompt: Tensor) -> Tensor:
        raise NotImplementedError

    def _step(self, key: object) -> Tensor:
        raise NotImplementedError

    def _mutable(self) -> list[Tensor]:
        raise NotImplementedError

    def _graph_key(self, ahead: int = 0) -> object:
        """Which graph replays the step ``ahead`` steps from now."""
        return None

    def _check_room(self) -> None:
        pass

    def _advance(self) -> None:
        self.length += 1


class MegalodonDecoder(StaticDecoder):
    """:class:`StaticDecoder` of a :class:`~megalodon_lite.model.MegalodonLM`: memory of constant size.

    Buffers per layer: the timestep norm's ``count`` (B,), ``mean`` and ``var`` (B, G); the CEMA
    state (B, D, N) complex; keys (B, H, chunk_size, dz) and values (B, H, chunk_size, dv) of the
    unfinished chunk; the final norm's statistics; ``pos``, the position inside the chunk. One graph.

    Args:
        model: the model, in eval mode.
        batch_size: B, rows decoded together.
        cuda_graph: replay each step as a CUDA graph (the model must be on CUDA).
        prefill_piece: tokens of the prompt per forward call in ``prefill`` (default: one chunk).
    """

    def __init__(self, model: nn.Module, batch_size: int, *, cuda_graph: bool = False,
                 prefill_piece: int | None = None) -> None:
        super().__init__(model, batch_size, cuda_graph=cuda_graph)
        cfg = model.config
        self.chunk_size = cfg.chunk_size
        self.prefill_piece = validate.positive_int("prefill_piece", prefill_piece or cfg.chunk_size)
        # the CEMA coefficients depend on the parameters only: computed once
        self.cema_coefficients = [block.mega.cema.coefficients() for block in model.blocks]
        self.pos = torch.zeros((), dtype=torch.int64, device=self.device)
        self.slots = torch.arange(cfg.chunk_size, device=self.device)
        self.layers: list | None = None  # LayerState-like buffers, allocated by the first prefill
        self.final_norm: TimestepNormState | None = None

    @property
    def position(self) -> int:
        """Position inside the current chunk of the next token (host copy of ``pos``)."""
        return self.length % self.chunk_size

    @property
    def state_nbytes(self) -> int:
        """Bytes of every buffer of the stream's state (constant: full chunk buffers included)."""
        return sum(t.nbytes for t in self._state_tensors())

    def _state_tensors(self) -> list[Tensor]:
        out = [self.pos, *self.final_norm]
        for layer in self.layers:
            out += [*layer.norm, layer.cema, layer.attention.k, layer.attention.v]
        return out

    def _load(self, prompt: Tensor) -> Tensor:
        from megalodon_lite.attention import ChunkKVCache
        from megalodon_lite.model import LayerState

        state = None
        for start in range(0, prompt.shape[1], self.prefill_piece):
            logits, state = self.model(prompt[:, start:start + self.prefill_piece], state)
        if self.layers is None:  # buffers shaped by the first state (dtypes as the model made them)
            def full_chunk(t: Tensor) -> Tensor:
                return t.new_zeros(*t.shape[:2], self.chunk_size, t.shape[3])
            self.layers = [LayerState(TimestepNormState(*(t.clone() for t in s.norm)), s.cema.clone(),
                                      ChunkKVCache(full_chunk(s.attention.k), full_chunk(s.attention.v)))
                           for s in state.layers]
            self.final_norm = TimestepNormState(*(t.clone() for t in state.final_norm))
        for buffers, s in zip(self.layers, state.layers):
            for buffer, value in zip((*buffers.norm, buffers.cema), (*s.norm, s.cema)):
                buffer.copy_(value)
            n = s.attention.length
            buffers.attention.k[:, :, :n] = s.attention.k
            buffers.attention.v[:, :, :n] = s.attention.v
        for buffer, value in zip(self.final_norm, state.final_norm):
            buffer.copy_(value)
        self.pos.fill_(prompt.shape[1] % self.chunk_size)
        return logits[:, -1]

    def state(self):
        """The stream's state as :class:`~megalodon_lite.model.MegalodonState` (copies), to continue
        with ``model(tokens, state)``."""
        from megalodon_lite.attention import ChunkKVCache
        from megalodon_lite.model import LayerState, MegalodonState

        n = self.position
        layers = [LayerState(TimestepNormState(*(t.clone() for t in s.norm)), s.cema.clone(),
                             ChunkKVCache(s.attention.k[:, :, :n].clone(), s.attention.v[:, :, :n].clone()))
                  for s in self.layers]
        return MegalodonState(layers, TimestepNormState(*(t.clone() for t in self.final_norm)))

    def _mutable(self) -> list[Tensor]:
        # keys and values are only written at slot pos, which the captured step writes again
        out = [self.pos, *self.final_norm]
        for layer in self.layers:
            out += [*layer.norm, layer.cema]
        return out

    def _norm_step(self, norm: nn.Module, stats: TimestepNormState, x: Tensor) -> Tensor:
        """TimestepNorm of one step x (B, 1, D) from the statistics in ``stats``, updated in place."""
        y, new = timestep_norm(x, norm.weight, norm.bias, norm.num_groups, stats, eps=norm.eps)
        for buffer, value in zip(stats, new):
            buffer.copy_(value)
        return y

    def _attention_step(self, attention: nn.Module, buffers, z: Tensor, v: Tensor, visible: Tensor) -> Tensor:
        """ChunkAttention of one token: z (B, 1, z_dim), v (B, 1, value_dim) -> (B, 1, value_dim)."""
        heads, batch = attention.num_heads, z.shape[0]
        q, k = normalized_qk(attention.z_norm(z.unflatten(-1, (heads, attention.z_head_dim))),
                             attention.gamma, attention.beta)
        position = self.pos.view(1)
        q = attention.rope(q.transpose(1, 2), position)  # (B, H, 1, dz), RoPE at the position in the chunk
        k = attention.rope(k.transpose(1, 2), position)
        v = v.unflatten(-1, (heads, attention.v_head_dim)).transpose(1, 2)
        keys, values = buffers.attention.k, buffers.attention.v
        keys.index_copy_(2, position, k.to(keys.dtype))
        values.index_copy_(2, position, v.to(values.dtype))
        o = masked_attention(q.to(keys.dtype), keys, values, visible, scale=1.0)
        return o.transpose(1, 2).reshape(batch, 1, attention.value_dim)

    def _step(self, key: object) -> Tensor:
        model, cfg = self.model, self.model.config
        x = model.embed(self.token)
        if cfg.scale_emb:
            x = x * math.sqrt(cfg.model_dim)
        visible = self.slots <= self.pos  # this chunk's tokens so far and the new one
        for block, buffers, (p, q, gamma) in zip(model.blocks, self.layers, self.cema_coefficients):
            layer = block.mega
            X = self._norm_step(layer.timenorm, buffers.norm, x)
            X = X.to(activation_dtype(X))  # as MegalodonLayer.forward
            ema, h = cema_recurrence(X, p, q, gamma, layer.cema.omega, buffers.cema)
            buffers.cema.copy_(h)
            mx = layer.rmsnorm(ema)
            v = F.silu(self.linear(layer.wv, X))
            r = F.silu(self.linear(layer.wr, mx))
            attn = self._attention_step(layer.attention, buffers, self.linear(layer.wz, mx), v, visible)
            y = self.linear(layer.wh1, mx) + self.linear(layer.wh2, attn * r) + x
            x = self._ffn(block.ffn, y, residual=x)
        x = self._norm_step(model.final_norm, self.final_norm, x)
        self.pos.add_(1).remainder_(self.chunk_size)  # a full chunk starts the next one at slot 0
        return self.linear(model.head, x)[:, 0]

    def _ffn(self, ffn: nn.Module, y: Tensor, residual: Tensor) -> Tensor:
        """NormalizedFFN.forward (no dropout) with the decoder's linear weights."""
        u = ffn.norm(y)
        hidden = F.silu(self.linear(ffn.fc1, u))
        if ffn.fc3 is not None:
            hidden = hidden * self.linear(ffn.fc3, u)
        out = self.linear(ffn.fc2, hidden)
        return (out * ffn.alpha if ffn.alpha is not None else out) + residual


class LlamaDecoder(StaticDecoder):
    """:class:`StaticDecoder` of a :class:`~megalodon_lite.baseline.LlamaLM`: a KV cache for the
    whole stream, allocated by ``prefill``.

    Args:
        model: the model, in eval mode.
        batch_size: B.
        max_length: tokens the cache holds, prompt and continuation together.
        cuda_graph: replay each step as a CUDA graph, one per attention span (the model must be on CUDA).
    """

    def __init__(self, model: nn.Module, batch_size: int, max_length: int, *, cuda_graph: bool = False) -> None:
        super().__init__(model, batch_size, cuda_graph=cuda_graph)
        self.capacity = validate.positive_int("max_length", max_length)
        self.pos = torch.zeros((), dtype=torch.int64, device=self.device)
        self.slots = torch.arange(max_length, device=self.device)
        self.cache = None

    @property
    def state_nbytes(self) -> int:
        """Bytes of the KV cache buffers (all ``max_length`` positions, all layers)."""
        return self.cache.nbytes + self.pos.nbytes

    def _load(self, prompt: Tensor) -> Tensor:
        from megalodon_lite.baseline import KVCache

        if prompt.shape[1] > self.capacity:
            raise ValueError(f"the prompt has {prompt.shape[1]} tokens, the decoder's cache holds "
                             f"max_length={self.capacity}")
        if self.cache is not None and self.graphs:
            raise RuntimeError("this decoder's graphs point at its first cache: build a new decoder per prompt")
        logits, self.cache = self.model(prompt, KVCache.empty(self.capacity))
        for buffer in self.cache.keys + self.cache.values:
            buffer[:, :, prompt.shape[1]:] = 0  # unwritten memory may hold NaN, and 0 x NaN is NaN even masked
        self.pos.fill_(prompt.shape[1])
        return logits[:, -1]

    def state(self):
        """The :class:`~megalodon_lite.baseline.KVCache` (the decoder's own buffers), at the current length."""
        self.cache.length = self.length
        return self.cache

    def _check_room(self) -> None:
        if self.length >= self.capacity:
            raise ValueError(f"the decoder's cache is full: it holds max_length={self.capacity} tokens")

    def _graph_key(self, ahead: int = 0) -> int:
        return attention_span(min(self.length + ahead + 1, self.capacity), self.capacity)

    def _mutable(self) -> list[Tensor]:
        return [self.pos]  # the cache is only written at slot pos, which the captured step writes again

    def _step(self, span: int) -> Tensor:
        model = self.model
        batch = self.batch_size
        x = model.embed(self.token)
        position = self.pos.view(1)
        visible = self.slots[:span] <= self.pos
        for block, keys, values in zip(model.blocks, self.cache.keys, self.cache.values):
            u = block.attn_norm(x)
            q, k, v = (self.linear(w, u).view(batch, 1, block.num_heads, block.head_dim).transpose(1, 2)
                       for w in (block.wq, block.wk, block.wv))
            q, k = block.rope(q, position), block.rope(k, position)
            keys.index_copy_(2, position, k.to(keys.dtype))
            values.index_copy_(2, position, v.to(values.dtype))
            o = masked_attention(q.to(keys.dtype), keys[:, :, :span], values[:, :, :span], visible,
                                 scale=1.0 / math.sqrt(block.head_dim))
            h = x + self.linear(block.wo, o.transpose(1, 2).reshape(batch, 1, -1))
            u = block.ffn_norm(h)
            x = h + self.linear(block.w2, F.silu(self.linear(block.w1, u)) * self.linear(block.w3, u))
        self.pos.add_(1)
        return self.linear(model.head, model.norm(x))[:, 0]


def make_decoder(model: nn.Module, batch_size: int, max_length: int, *, cuda_graph: bool = False) -> StaticDecoder:
    """The decoder of ``model`` (MegalodonLM or LlamaLM) for ``batch_size`` rows of at most
    ``max_length`` tokens (prompt and continuation; Megalodon's memory does not depend on it)."""
    from megalodon_lite.baseline import LlamaLM
    from megalodon_lite.model import MegalodonLM

    if isinstance(model, MegalodonLM):
        return MegalodonDecoder(model, batch_size, cuda_graph=cuda_graph)
    if isinstance(model, LlamaLM):
        return LlamaDecoder(model, batch_size, max_length, cuda_graph=cuda_graph)
    raise TypeError(f"model must be a MegalodonLM or a LlamaLM, got {type(model).__name__}")


@torch.no_grad()
def static_generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, generator: torch.Generator | None = None,
                    cuda_graph: bool | None = None) -> Tensor:
    """``generate`` on fixed-size buffers: ``prompt`` (B, P) -> (B, max_new_tokens) int64 sampled
    tokens, in eval mode (the previous mode restored). Graphs on CUDA unless ``cuda_graph=False``."""
    was_training = model.training
    model.eval()
    try:
        tokens = list(decode_stream(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                    generator=generator, cuda_graph=cuda_graph))
    finally:
        model.train(was_training)
    if not tokens:
        return prompt.new_zeros((prompt.shape[0], 0), dtype=torch.int64)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def decode_stream(model: nn.Module, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                  top_k: int | None = None, generator: torch.Generator | None = None,
                  cuda_graph: bool | None = None) -> Iterator[Tensor]:
    """Yield ``max_new_tokens`` sampled tokens, each (B,) int64, after ``prompt`` (B, P).

    The decoding loop of ``generate`` on fixed-size buffers (graphs on CUDA unless
    ``cuda_graph=False``). The model must be in eval mode; the caller sets autocast, if any, around
    the whole loop. See :func:`~megalodon_lite.model.sample_next_token` for the sampling options.
    """
    from megalodon_lite.model import sample_next_token

    validate.tokens(prompt, model.config.vocab_size, name="prompt")
    validate.non_negative_int("max_new_tokens", max_new_tokens)
    validate.sampling(temperature, top_k, model.config.vocab_size)
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    decoder = make_decoder(model, prompt.shape[0], prompt.shape[1] + max_new_tokens,
                           cuda_graph=use_cuda_graph(cuda_graph, device))
    logits = decoder.prefill(prompt)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, generator)
        yield token
        if step + 1 < max_new_tokens:
            logits = decoder.step(token)
