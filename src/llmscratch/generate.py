"""Sampling from a model: greedy, temperature, top-k, top-p, eos and stop strings, streaming.

One sampler serves every caller (CLI, chat, evaluation). Decoding uses the model's KV cache; the uncached
path (`use_cache=False`) recomputes the whole window each step as the book's `generate_text_simple` does and
is kept as the reference the cached path is tested against.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from llmscratch.errors import UserError
from llmscratch.model.attention import RowPositions
from llmscratch.tokenizer.base import Tokenizer, prompt_ids


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one next token per row of `logits` (B, V). temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        # The first index of the largest logit, as argmax; `max` finds it ~4× faster on a CPU (bf16 logits of
        # GPT-2's 50,257-token vocabulary: 50 vs 190 µs, a step's 1%).
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose probability mass
        # reaches top_p. A token is dropped when the mass *before* it already reaches top_p, so the most
        # likely token always survives.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CompiledDecodeStep:
    """`step(idx (B, 1), pos 0-dim tensor) -> logits (B, V)`: one cached decoding step with static shapes,
    compiled with `torch.compile`. Every call with the same batch size and KV-cache length has one shape; a new
    shape compiles once more.

    On a GPU it runs as CUDA graphs (`mode="reduce-overhead"`), which replay the step's hundreds of kernel
    launches as one. On a CPU one block is compiled and its graph serves every layer
    (`GPT.forward(one_block_graph=True)`), with the weights as the graph's inputs: they are read where they
    live, never copied, and a change to them (an optimizer step) is seen by the next call. Pack the linears
    first (`llmscratch.model.packed`, as `llmscratch generate` does) for oneDNN's fast matrix-vector products;
    plain `nn.Linear` layers compile too, to inductor's slower ones.

    (Until this design the CPU step was compiled with inductor's "freezing", which folds every layer's weights
    into the graph as constants: ~20 s of compilation for GPT-2 124M in every process, since frozen graphs
    bypass inductor's on-disk cache, a second copy of the weights, and a rebuild whenever they changed. Now:
    ~18 s the first time on a machine and ~5 s after that, for a step ~5% slower in bf16 — inductor cannot
    fuse GELU and the residual additions into an operator it does not know — and faster in fp32, where
    freezing packed for MKL rather than oneDNN; benchmarks/RESULTS.md.)
    """

    builds = 0  # compiled functions made so far, in this process

    def __init__(self, model):
        self.model = model
        self.on_gpu = next(model.parameters()).is_cuda
        self._by_layout: dict[tuple, object] = {}  # CPU: one compiled function per `_layout`
        self._step = self._compile() if self.on_gpu else None

    def _compile(self):
        model, one_block_graph = self.model, not self.on_gpu

        def decode(idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return model(idx, input_pos=pos, one_block_graph=one_block_graph)[:, -1]

        # Dynamo keeps its compiled graphs on the function's code object, which every `decode` made here would
        # share: past Dynamo's recompile limit (8) the step would fall back to slow eager code. Each compiled
        # function gets its own copy of the code instead.
        CompiledDecodeStep.builds += 1
        decode.__code__ = decode.__code__.replace(co_name=f"decode_step_{CompiledDecodeStep.builds}")
        options = {}
        if not self.on_gpu:
            # Each compiled function serves one `_layout` of the model, which `__call__` checks per generation, and
            # Dynamo checks its tensors' guards on each generation's first step. So per call, no guards on the
            # model's modules, which Dynamo checks even when told to skip guards (~0.25 ms of a ~12 ms GPT-2 124M
            # step on the 2-core CPU of benchmarks/RESULTS.md), and no checks of every input's sizes and strides
            # in inductor's generated code.
            if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):
                options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            from torch._inductor import config as inductor_config

            from llmscratch.model.packed import lower_to_onednn_call

            if hasattr(inductor_config, "size_asserts"):
                options["size_asserts"] = False
            lower_to_onednn_call()  # the packed linears: oneDNN called from the generated code (model/packed.py)
        return torch.compile(decode, mode="reduce-overhead" if self.on_gpu else None, fullgraph=True,
                             dynamic=False, options=options or None)

    def _layout(self, idx: torch.Tensor) -> tuple:
        """What a CPU step's graph was compiled for: the input's shape, the modules' kinds and modes, and every
        parameter's and buffer's (KV caches included) shape, dtype and device. ~0.4 ms for GPT-2 124M on the
        2-core CPU of benchmarks/RESULTS.md, once a generation. (Strides are left to Dynamo's guards on the
        tensors, which it still checks on each generation's first step.)"""
        modules = tuple((type(m), m.training) for m in self.model.modules())
        tensors = tuple((t.shape, t.dtype, t.device) for t in (*self.model.parameters(), *self.model.buffers()))
        return tuple(idx.shape), idx.device, modules, tensors

    def __call__(self, idx: torch.Tensor, pos: torch.Tensor, same_shapes: bool = False) -> torch.Tensor:
        """`same_shapes`: the caller promises the shapes, dtypes and devices of the previous call (the steps of
        one generation). Dynamo then skips its guards — hundreds of checks on every input and parameter,
        ~0.35 ms a call on the 2-core CPU of benchmarks/RESULTS.md — and runs the compiled step directly."""
        if same_shapes:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._step(idx, pos)
        if not self.on_gpu:
            layout = self._layout(idx)
            if layout not in self._by_layout:
                self._by_layout[layout] = self._compile()
            self._step = self._by_layout[layout]
        return self._step(idx, pos)  # may compile


def compiled_decode_step(model) -> CompiledDecodeStep:
    """The model's compiled decoding step, built on first use and kept in the model's `decode_step` slot (it
    lives as long as the model, whose weights and KV-cache buffers its graph reads). A mixture-of-experts model
    has none: each step's token groups per expert change shape with the routing, which one graph cannot hold."""
    if getattr(model.config, "n_experts", 0):
        raise UserError(f"--compile: {model.config.name} is a mixture-of-experts model, whose decoding step cannot be "
                        "one compiled graph (its experts' token groups change with the routing); leave --compile off")
    step = built_decode_step(model)
    if step is None:
        step = model.decode_step = CompiledDecodeStep(model)
    return step


def built_decode_step(model) -> CompiledDecodeStep | None:
    """The compiled decoding step `compiled_decode_step` built for `model`, or None when none was built yet."""
    return getattr(model, "decode_step", None)


def _compiled_ahead_step(model, batch_size: int):
    """The model's compiled-ahead step from the cache folder, or None after starting one building (model/aot.py);
    says so on stderr when it starts one."""
    from llmscratch.model import aot

    step = aot.load_step(model, batch_size)
    if step is None and aot.start_background_build(model, batch_size):
        sys.stderr.write("llmscratch: compiling this model shape's decoding step in the background, once per "
                         f"machine; later commands decode through it (turn off: {aot.ENV}=off)\n")
    return step


def static_cache_len(needed: int, context_length: int, on_gpu: bool) -> int:
    """KV-cache length of a compiled generation that needs `needed` positions.

    The static-shape step attends over the whole cache, masking its unfilled tail. On a GPU that costs little,
    so the cache spans the full context and one compiled step (one CUDA graph) serves every call. On a CPU,
    reading the cache competes with the weights for memory bandwidth — a 1,024-slot cache made a GPT-2 124M
    step ~50% slower than a 128-slot one — so the length is the next power of two (at least 64): a few
    compilations at most, and never more than twice the positions needed.
    """
    if on_gpu:
        return context_length
    return min(context_length, max(64, 1 << (needed - 1).bit_length()))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_prefix(model, held: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading `ids` need not be processed again where a cache row holds `held` at positions 0, 1, ...:
    the ids they share, less the last of `ids` (whose logits the next step needs). None for `ids` longer than the
    context (they slide).

    A model with sliding-window layers keeps there a ring of the last `sliding_window` positions
    (`WindowKVCache`). While `held` fits in it, position p is in slot p, and what a later position wrote into a
    slot is masked by position, so any shared part is whole. Past it, the ring holds only `held`'s last
    positions: going on from n needs the window before n, there only when n is at least len(held) - 1 (the next
    turn of a conversation, which repeats all of it). Otherwise none is reused."""
    cfg = model.config
    if not held or len(ids) > cfg.context_length:
        return 0
    n = min(common_prefix(held, ids), len(ids) - 1)
    if any(cfg.sliding_layers) and len(held) > cfg.sliding_window and n < len(held) - 1:
        return 0
    return n


def _first_cache(model):
    """The first layer's KV cache (None: none, or a model without `blocks`, as the tests' scripted ones)."""
    blocks = getattr(model, "blocks", None)
    return blocks[0].attn.kv_cache if blocks else None


def mark_cache(model, kept: KeptPrefix | None) -> None:
    """Note on the model's KV cache whose entries it is about to hold: `kept`'s, or None (a generation without
    one, a batch). A `KeptPrefix` reuses a cache only while the mark is its own."""
    cache = _first_cache(model)
    if cache is not None:
        cache.written_for = kept


class KeptPrefix:
    """What the model's KV cache holds after a generation, kept for the next one: a conversation's next turn,
    whose prompt repeats the turns so far, then processes only what it adds (`generate_ids(kept=...)`; `chat`).
    Without it every turn reads the whole conversation again — ~1.2 s for 800 tokens of GPT-2 124M on the 2-core
    CPU of benchmarks/RESULTS.md — before its first token.

    `ids`: the token ids at positions 0, 1, ... of the cache (batch row 0). The cache stays allocated between
    generations and is reused only while it is the one the model holds and the last generation or batch that
    wrote to it was this one's (`mark_cache`); the model's weights must not change in between. The tokens may
    differ from those of a fresh generation by rounding (the held keys were computed in other chunks), as
    batched decoding's may."""

    def __init__(self):
        self.ids: list[int] = []
        self._cache = None

    def reusable(self, model, ids: Sequence[int]) -> int:
        """How many leading `ids` the model's cache already holds, ready to use."""
        cache = _first_cache(model)
        if self._cache is None or cache is not self._cache or getattr(cache, "written_for", None) is not self:
            return 0
        return reusable_prefix(model, self.ids, ids)

    def hold(self, model, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        self._cache = _first_cache(model) if self.ids else None


@torch.inference_mode()
def generate_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 seed: int | None = None, use_cache: bool = True, compile: bool = False,
                 compiled_ahead: bool = False, kept: KeptPrefix | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time for prompts `prompt_ids` (B, T) of equal length.

    Rows that produced `eos_id` keep yielding `eos_id`; the iterator ends when every row has, or after
    `max_new_tokens`. Past the context length the window is cropped to the last `context_length` tokens.
    `compile=True` runs the per-token steps through `compiled_decode_step` (static KV cache; CUDA graphs on a
    GPU, one compiled block graph for every layer on a CPU); the prompt itself is processed eagerly. The tokens
    are the same as without it.
    `compiled_ahead=True` (what `generate` and `chat` ask for): without `compile`, the per-token steps run through
    a step compiled ahead of time for this model's shape when the cache folder holds one (model/aot.py), and the
    prompt eagerly; when it holds none, one is started building in the background for later calls, and this
    one decodes eagerly.
    `kept` (one prompt, with the cache): the model's KV cache is kept when the generation ends, and what it holds
    noted there; the next generation given the same `KeptPrefix` starts after the ids its prompt shares with it.
    """
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    if prompt_ids.size(1) == 0:
        raise UserError("the prompt is empty: give at least one token")
    device = next(model.parameters()).device
    seq = prompt_ids.to(device)
    ctx = model.config.context_length
    generator = seeded_generator(seed, device)
    step = _compiled_step(model, seq.size(0), compile, compiled_ahead) if use_cache else None
    was_training = model.training
    model.eval()
    done = torch.zeros(seq.size(0), dtype=torch.bool, device=device)
    # Number of tokens of `seq` already in the cache.
    pos = _setup_cache(model, seq, min(ctx, seq.size(1) + max_new_tokens), step, kept) if use_cache else 0
    pos_t = torch.zeros((), dtype=torch.long, device=device)  # the step's position, kept on the device
    stepped = False  # whether the compiled step has run in this generation (then its shapes are known)
    intact = True  # whether the cache holds seq[:, :pos] at positions 0, 1, ... (what `kept` is told)
    nxt = seq[:, -1]
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                last = model(seq[:, -ctx:])[:, -1]
            elif seq.size(1) <= ctx and pos > 0:
                if step is not None and seq.size(1) == pos + 1:  # one new token, the one just sampled
                    pos_t.fill_(pos)  # a device-side write, no host sync
                    last = step(nxt[:, None], pos_t, same_shapes=stepped)  # (B, 1): same strides each call
                    stepped = True
                else:  # the prompt (after a kept prefix), or any token without a compiled step
                    last = model(seq[:, pos:], input_pos=pos, last_only=True)[:, -1]
            else:
                # First step, or the window slid past the context: positions shift, so refill the cache.
                intact = seq.size(1) <= ctx
                last = model(seq[:, -ctx:], input_pos=0, last_only=True)[:, -1]
            pos = min(seq.size(1), ctx)
            nxt = sample_next(last, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            yield nxt
            if eos_id is not None and bool(done.all()):
                break
    except GeneratorExit:  # closed at a `yield`: the cache is whole
        raise
    except BaseException:  # (Ctrl-C included) a step may have stopped halfway through writing the cache
        intact = False
        raise
    finally:
        if kept is not None:
            kept.hold(model, seq[0, :pos].tolist() if use_cache and intact and seq.size(0) == 1 else [])
        elif use_cache and built_decode_step(model) is None:
            model.clear_kv_cache()  # (a model with a compiled step keeps its cache: the step's graph uses it)
        model.train(was_training)


def _compiled_step(model, batch_size: int, compile: bool, compiled_ahead: bool):
    """What a generation's per-token steps run through: `compile`'s step, else the compiled-ahead one when asked
    for and built; None: the model itself."""
    if compile:
        return compiled_decode_step(model)
    return _compiled_ahead_step(model, batch_size) if compiled_ahead else None


def seeded_generator(seed: int | None, device) -> torch.Generator | None:
    """A random generator on `device` seeded with `seed`; None (the global one) without a seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _setup_cache(model, seq: torch.Tensor, needed: int, step, kept: KeptPrefix | None) -> int:
    """Give the model a KV cache for a generation of `seq` (B, T) that needs `needed` positions, keeping what `kept`
    holds of it; return how many of `seq`'s tokens the cache already holds. A compiled step has one shape for
    every call of a generation, so its cache length is fixed up front."""
    pos = kept.reusable(model, seq[0].tolist()) if kept is not None and seq.size(0) == 1 else 0
    if step is not None:
        model.setup_kv_cache(seq.size(0), static_cache_len(needed, model.config.context_length, step.on_gpu),
                             keep=pos > 0)
    else:
        model.setup_kv_cache(seq.size(0), needed, at_least=True, keep=pos > 0)
    mark_cache(model, kept)
    return pos


class TextStream:
    """The text of a growing list of generated token ids, decoded incrementally, and how much of it `stream`
    may show: text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or could
    still be the start of a stop string, so the pieces joined equal the decoded ids exactly.

    Each token costs the decoding of a few ids, not of all of them. The ids that decoded to text not ending in
    U+FFFD are settled: their text is final. The unsettled ones after them are decoded together with the last
    settled token(s) as context (as vLLM's detokenizer does), which keeps what depends on a neighbour right —
    a SentencePiece tokenizer drops the leading space of a sequence's first word — and their text is what that
    decoding adds to the context's. Of the text, only the part that can still matter is kept: what is not shown
    yet, and before it as many characters as the longest stop string has, less one (where a stop string that
    ends in the new text can begin).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.lookback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.context = self.settled = 0  # ids[context:settled]: decoded again as the unsettled ids' context
        self.context_text = ""  # their text on its own
        self.kept = ""  # the settled text from absolute offset `base` on
        self.base = self.shown = 0  # absolute offsets (characters) where `kept` begins and the shown text ends
        self.stopped = False

    def add(self, token: int) -> str:
        """Take the next token; return the text that may be shown now ("" if none). After a stop string, the
        text before it comes out and `stopped` is set: add nothing more."""
        self.ids.append(token)
        window = self.tokenizer.decode(self.ids[self.context:])
        pending = window[len(self.context_text):]
        text = self.kept + pending  # the whole text from `base` on
        shown = self.shown - self.base
        cut = _first_stop(text[max(0, shown - self.lookback):], self.stop)
        if cut is not None:
            self.stopped = True
            return self._show(text, max(0, shown - self.lookback) + cut)
        safe = len(text)
        while safe > shown and text[safe - 1] == "\ufffd":
            safe -= 1
        piece = self._show(text, min(safe, _stop_prefix_start(text, self.stop)))
        if not pending.endswith("\ufffd"):  # the new ids' text is final: settle them
            self.kept += pending
            self.context, self.settled = self.settled, len(self.ids)
            self.context_text = self.tokenizer.decode(self.ids[self.context:self.settled])
        drop = min(self.shown - self.lookback - self.base, len(self.kept))
        if drop > 0:
            self.kept, self.base = self.kept[drop:], self.base + drop
        return piece

    def _show(self, text: str, end: int) -> str:
        """text[shown:end] (relative to `base`), now counted as shown."""
        start = self.shown - self.base
        if end <= start:
            return ""
        self.shown = self.base + end
        return text[start:end]

    def finish(self) -> str:
        """Everything not shown yet, held-back characters included (nothing after a stop string)."""
        if self.stopped:
            return ""
        window = self.tokenizer.decode(self.ids[self.context:]) if len(self.ids) > self.settled else ""
        text = self.kept + window[len(self.context_text):]
        return self._show(text, len(text))


def stream(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop: Sequence[str] = (), stop_at_eos: bool = True, use_cache: bool = True,
           compile: bool = False, compiled_ahead: bool = False, kept: KeptPrefix | None = None) -> Iterator[str]:
    """Yield the generated text piece by piece for one prompt.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or could still be
    the start of a stop string, so the pieces joined equal the final text exactly; each token decodes only the
    few latest ids (`TextStream`). `compile`, `compiled_ahead`, `kept`: see `generate_ids`.
    """
    ids = prompt_ids(tokenizer, prompt)
    eos = tokenizer.eos_id if stop_at_eos else None
    text = TextStream(tokenizer, stop)
    for nxt in generate_ids(model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, eos,
                            seed, use_cache, compile=compile, compiled_ahead=compiled_ahead, kept=kept):
        token = int(nxt[0])
        if eos is not None and token == eos:
            break
        piece = text.add(token)
        if piece:
            yield piece
        if text.stopped:
            return
    rest = text.finish()
    if rest:
        yield rest


def generate(model, tokenizer: Tokenizer, prompt: str, **kwargs) -> str:
    """The generated continuation of `prompt` as one string (see `stream` for the options)."""
    return "".join(stream(model, tokenizer, prompt, **kwargs))


class Row:
    """One sequence of a `DecodeBatch`: its token ids (the prompt, then each token generated) and how its next
    tokens are drawn. `key`: whatever the caller uses to know the row (a request, an index)."""

    def __init__(self, prompt_ids: Sequence[int], temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, key=None):
        if len(prompt_ids) == 0:
            raise UserError("the prompt is empty: give at least one token")
        self.ids = [int(i) for i in prompt_ids]
        self.n_prompt = len(self.ids)
        self.temperature, self.top_k, self.top_p, self.seed, self.key = temperature, top_k, top_p, seed, key
        self.generator: torch.Generator | None = None  # made on the model's device when the row is admitted
        self.cached = 0  # how many of the row's window positions the cache holds (0: it must be filled)
        self.reused = 0  # how many of its prompt's tokens were found in the cache when it was admitted

    @property
    def generated(self) -> list[int]:
        return self.ids[self.n_prompt:]


class _Held(list):
    """The token ids a parked cache row holds at positions 0, 1, ...; `prompt`: how many of them were its
    request's prompt."""

    def __init__(self, ids: Sequence[int], prompt: int):
        super().__init__(ids)
        self.prompt = prompt


class DecodeBatch:
    """Continuous batching: sequences of any lengths decoded together in the model's one KV cache.

    Each row of the cache holds one sequence at positions 0, 1, ... of its own (`RowPositions`, model/attention.py):
    learned position embeddings and RoPE see every row at its true positions, and each row attends to its own keys
    only. `add` queues a row; `step` admits queued rows while there is room, then feeds every active row: a row in
    the cache its newest token, a new row its prompt. `remove` takes a row out at once, moving the last row's cache
    into its place so the active rows stay rows 0..n-1 of the cache, read without a copy.

    Prompts are processed in chunks of at most `prefill_tokens` tokens a step, all new rows together (chunked
    prefill): a long prompt, or many arriving at once, delays the other rows' next tokens by one chunk's work, not
    by all of it, and the first new rows get their first token sooner. A row whose prompt needs several chunks
    yields its first token at the step its last chunk goes in.

    A row whose window would pass the context length slides, as `generate_ids` does: from then on its last
    `context_length` tokens are processed again at every token. So with greedy decoding every row gets the tokens
    it would get decoded alone (up to floating-point rounding: a batched matmul may sum in another order).
    Sampled rows draw from their own generator (seeded by `Row.seed`), so their tokens do not depend on which
    other rows share the batch either.

    `compiled_ahead` (what the server asks for): on a CPU, the steps that feed rows their newest token run
    through a step compiled ahead of time for the batch's size and cache length when the cache folder holds
    one (model/aot.py); when it does not, one is started building in the background, and looked for again every
    10 s. Prompts are processed eagerly.

    `reuse` (prefix caching): a finished row's keys and values stay in its cache row while the row is free
    (`parked`), and a new row whose prompt begins with a parked row's tokens starts after the tokens they share
    (`Row.reused`): a conversation's next turn, which repeats the turns so far, takes the cache row over; prompts
    that share only a beginning (a system prompt, a long instruction) get a copy of it (`_place`). When a row is
    needed, a free one that holds nothing goes first, then the one parked (or copied from) longest ago. Parking
    costs a swap of two cache rows when a row leaves (a move without it).
    `spare_rows` more cache rows than `max_rows` hold parked rows only: without them a full batch has no free row
    to park in, and a conversation whose next turn arrives while `max_rows` others are decoding finds nothing
    (memory: the KV cache grows by that many rows). In models with sliding-window layers, a row that held more
    than the window is reused only by a prompt that repeats all of it (`reusable_prefix`).
    """

    def __init__(self, model, max_rows: int, max_len: int | None = None, prefill_tokens: int = 256,
                 compiled_ahead: bool = False, reuse: bool = True, spare_rows: int = 0):
        if max_rows <= 0:
            raise UserError(f"batch size must be positive, got {max_rows}")
        if spare_rows < 0:
            raise UserError(f"spare cache rows must be 0 or more, got {spare_rows}")
        if prefill_tokens <= 0:
            raise UserError(f"prefill chunk must be positive, got {prefill_tokens}")
        self.model, self.max_rows, self.prefill_tokens = model, max_rows, prefill_tokens
        self.cache_rows = max_rows + (spare_rows if reuse else 0)  # rows past max_rows only ever hold parked ones
        self.compiled_ahead = compiled_ahead
        self._rows_step, self._rows_looked = None, (None, 0.0)  # (cache length, when) of the last look for one
        self.ctx = model.config.context_length
        self.device = next(model.parameters()).device
        self.active: list[Row] = []  # cache row i holds active[i]
        self.waiting: deque[Row] = deque()
        self.reuse = reuse
        # Free cache rows (i >= len(active)) that still hold a finished row's keys and values: row -> its window's
        # ids at positions 0, 1, ..., oldest parked first.
        self.parked: dict[int, _Held] = {}
        self.reused_tokens = 0  # prompt tokens not processed because a parked row held them
        self.was_training = model.training
        model.eval()
        model.setup_kv_cache(self.cache_rows, min(self.ctx, max_len or 256))
        mark_cache(model, None)

    def add(self, row: Row) -> None:
        self.waiting.append(row)

    @torch.inference_mode()  # the cache may hold inference tensors (grown in `step`)
    def remove(self, row: Row) -> None:
        """Take `row` out of the batch (finished, or its client left), freeing its place for a waiting one."""
        if row in self.waiting:
            self.waiting.remove(row)
            return
        if row not in self.active:  # taken from the queue by a step that failed before it joined
            return
        i = self.active.index(row)
        last = len(self.active) - 1
        park = self.reuse and row.cached > 0
        if i != last:  # the last row moves into the gap: the active rows stay rows 0..n-1 of the cache
            if park:  # and this one's keys and values into its place, now free
                self.model.move_kv_rows([last, i], [i, last], max(row.cached, self.active[last].cached))
            else:
                self.model.move_kv_rows(last, i, self.active[last].cached)
            self.active[i] = self.active[last]
        self.active.pop()
        if park:
            held = self._window(row)[:row.cached]
            self.parked[last] = _Held(held, row.n_prompt if len(row.ids) <= self.ctx else len(held))

    def _place(self, row: Row) -> None:
        """Make cache row `len(active)`, where `row` goes, hold what a parked row shares with `row`'s prompt (the
        most leading tokens of any), so `row` starts after them, and nothing else it must keep.

        A prompt that repeats the parked request's whole prompt (a conversation's next turn; its answer may come
        back as other tokens, encoded again from its text) takes that row over. One that shares less (a system
        prompt, an instruction) gets a copy of those entries, and the parked row stays for its own conversation:
        taking it over would lose that conversation's turns to a few shared tokens. What was parked in the row
        `row` needs moves aside (`_move_aside`)."""
        slot = len(self.active)
        best, shared = None, 0
        if self.reuse:
            for r, ids in self.parked.items():
                n = reusable_prefix(self.model, ids, row.ids)
                if n > shared:
                    best, shared = r, n
        if best is not None and shared >= min(self.parked[best].prompt, len(self.parked[best]) - 1):
            if best != slot:
                self._swap(slot, best)
            del self.parked[slot]
        else:
            moved = self._move_aside(slot, keep=best)
            if best == slot:  # its entry moved (or was dropped); the slot still holds the entries
                best = moved
            elif best is not None:
                self.model.move_kv_rows(best, slot, shared)
            if best is not None:
                self.parked[best] = self.parked.pop(best)  # just used: the last to give way
        row.cached = row.reused = shared
        self.reused_tokens += shared

    def _move_aside(self, slot: int, keep: int | None) -> int | None:
        """Copy what is parked in `slot` to a free row that holds nothing, or over the row parked longest ago (not
        `keep`), or drop it when there is no such row; return where it went (None: nowhere)."""
        if slot not in self.parked:
            return None
        empty = [r for r in range(slot + 1, self.cache_rows) if r not in self.parked]
        others = [r for r in self.parked if r not in (slot, keep)]
        to = empty[0] if empty else others[0] if others else None
        if to is not None:
            self.model.move_kv_rows(slot, to, len(self.parked[slot]))
            # `slot`'s entry becomes `to`'s, in its place in the order; what `to` held is gone.
            self.parked = {(to if r == slot else r): ids for r, ids in self.parked.items() if r != to}
        else:
            del self.parked[slot]
        return to

    def _swap(self, a: int, b: int) -> None:
        """Exchange cache rows a and b, what is parked in them included (each keeps its place in the order)."""
        held = max(len(self.parked.get(a, ())), len(self.parked.get(b, ())))
        self.model.move_kv_rows([a, b], [b, a], held)
        self.parked = {{a: b, b: a}.get(r, r): ids for r, ids in self.parked.items()}

    def __len__(self) -> int:
        return len(self.active) + len(self.waiting)

    def close(self) -> None:
        """Free the model's KV cache (the model is left as it was found: eval or training mode)."""
        self.active.clear()
        self.waiting.clear()
        self.parked.clear()
        self.model.clear_kv_cache()
        self.model.train(self.was_training)

    def _window(self, row: Row) -> list[int]:
        """The tokens the cache must hold for the row's next token: all of them, or the last `context_length`."""
        return row.ids[-self.ctx:]

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int]]:
        """Admit waiting rows while there is room; feed every active row (its newest token, or the next chunk of
        its prompt); return (row, token) for each row that got a new token, appended to its `ids` too."""
        while self.waiting and len(self.active) < self.max_rows:
            row = self.waiting.popleft()
            row.generator = seeded_generator(row.seed, self.device)
            self._place(row)
            self.active.append(row)
        if not self.active:
            return []
        need = max(len(self._window(r)) for r in self.active)
        cache_len = self.model.blocks[0].attn.kv_cache.max_len
        if need > cache_len:  # grow by doubling: a few copies over a long generation, never past the context
            self.model.resize_kv_cache(max(need, 2 * cache_len))
        decode, chunks, budget = [], [], self.prefill_tokens
        for i, r in enumerate(self.active):
            todo = len(self._window(r)) - r.cached
            if todo == 1:
                decode.append(i)
            elif budget > 0:
                chunks.append((i, min(todo, budget)))
                budget -= chunks[-1][1]
        rows, logits = [], []
        if decode:
            rows.append(decode)
            logits.append(self._decode(decode))
        if chunks:
            done, done_logits = self._fill(chunks)
            if done:
                rows.append(done)
                logits.append(done_logits)
        if not rows:
            return []
        stepped = [self.active[i] for part in rows for i in part]
        tokens = self._sample(torch.cat(logits) if len(logits) > 1 else logits[0], stepped)
        for row, token in zip(stepped, tokens):
            row.ids.append(token)
            if len(row.ids) > self.ctx:
                row.cached = 0  # the window slid: every position changes, so it is processed again
        return list(zip(stepped, tokens))

    def _decode(self, rows: list[int]) -> torch.Tensor:
        """Next-token logits (n, V) of the cache `rows`, each fed its newest token."""
        active = [self.active[i] for i in rows]
        idx = torch.tensor([[r.ids[-1]] for r in active], device=self.device)  # (n, 1)
        at = RowPositions.make([r.cached for r in active], 1, rows, self.device)
        cache_len = self.model.blocks[0].attn.kv_cache.max_len
        step = self._compiled_rows(cache_len)
        if step is not None and step.fits(len(active), at, cache_len):
            logits = step(idx, at)
        else:
            logits = self.model(idx, input_pos=at)[:, -1]
        for r in active:
            r.cached += 1
        return logits

    def _compiled_rows(self, cache_len: int):
        """The compiled-ahead rows step for a cache of `cache_len` (model/aot.py), or None; a missing one is looked
        for at most every 10 s, and started building the first time."""
        if not self.compiled_ahead or self.cache_rows < 2:  # (one row: no rows step exists; `serve --max-batch 1`)
            return None
        if self._rows_step is not None and self._rows_step.cache_len == cache_len:
            return self._rows_step
        looked_len, looked_at = self._rows_looked
        now = time.monotonic()
        if looked_len == cache_len and now - looked_at < 10.0:
            return None
        from llmscratch.model import aot

        self._rows_step = aot.load_step(self.model, self.cache_rows, "rows", cache_len)
        if self._rows_step is None and looked_len != cache_len:
            aot.start_background_build(self.model, self.cache_rows, "rows", cache_len)
        self._rows_looked = (cache_len, now)
        return self._rows_step

    def _fill(self, chunks: list[tuple[int, int]]) -> tuple[list[int], torch.Tensor | None]:
        """Feed each (cache row, n) its next n window tokens, right-padded to the longest; return the rows whose
        window is now complete and their next-token logits (n_done, V)."""
        pieces = [self._window(self.active[i])[self.active[i].cached:][:n] for i, n in chunks]
        width = max(n for _, n in chunks)
        idx = torch.zeros(len(chunks), width, dtype=torch.long, device=self.device)
        for b, piece in enumerate(pieces):
            idx[b, :len(piece)] = torch.tensor(piece)
        rows = [i for i, _ in chunks]
        at = RowPositions.make([self.active[i].cached for i in rows], [n for _, n in chunks], rows, self.device)
        x = self.model.features(idx, input_pos=at)  # (n, width, d)
        done, last = [], []
        for b, (i, n) in enumerate(chunks):
            row = self.active[i]
            row.cached += n
            if row.cached == len(self._window(row)):
                done.append(i)
                last.append((b, n - 1))
        if not done:
            return [], None
        b_idx, t_idx = (torch.tensor(v, device=self.device) for v in zip(*last))
        return done, self.model.lm_head(x[b_idx, t_idx])  # (n_done, V)

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """One token per row of `logits`: greedy rows all at once, sampled rows each with its own settings."""
        tokens = logits.max(dim=-1).indices.tolist()  # greedy, as `sample_next` picks it
        for i, r in enumerate(rows):
            if r.temperature > 0:
                tokens[i] = int(sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)[0])
        return tokens


def generate_batch(model, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, stop: Sequence[str] = (), stop_at_eos: bool = True,
                   batch_size: int = 32, progress: bool = False) -> list[str]:
    """The continuations of many prompts, in order (evaluation sets, test-set responses), decoded `batch_size` at a
    time through a `DecodeBatch`: prompts of any lengths share the batch, a row leaves as soon as it ends (eos, a
    stop string, `max_new_tokens`) and the next prompt takes its place.

    With greedy decoding (temperature 0) each result equals `generate(model, tokenizer, prompt, ...)` for that
    prompt. With sampling and a `seed`, prompt i draws from a generator seeded `seed + i`.
    """
    from tqdm import tqdm

    eos = tokenizer.eos_id if stop_at_eos else None
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    results: list[str] = [""] * len(prompts)
    if not prompts or max_new_tokens <= 0:
        return results
    longest = max(len(ids) for ids in encoded)
    batch = DecodeBatch(model, min(batch_size, len(prompts)), max_len=longest + max_new_tokens)
    texts: dict[int, TextStream] = {}
    # Longest prompts first: rows admitted together have similar lengths, so little padding is processed.
    for i in sorted(range(len(prompts)), key=lambda i: -len(encoded[i])):
        batch.add(Row(encoded[i], temperature, top_k, top_p, None if seed is None else seed + i, key=i))
        texts[i] = TextStream(tokenizer, stop)
    try:
        with tqdm(total=len(prompts), disable=not progress, desc="generate", unit="prompt",
                  dynamic_ncols=True) as bar:
            while len(batch):
                for row, token in batch.step():
                    text, ended = texts[row.key], token == eos
                    if not ended:
                        text.add(token)
                        ended = text.stopped or len(row.generated) >= max_new_tokens
                    if ended:
                        results[row.key] = _finished_text(tokenizer, row.generated, eos, stop)
                        batch.remove(row)
                        bar.update(1)
    finally:
        batch.close()
    return results


def _finished_text(tokenizer: Tokenizer, generated: list[int], eos: int | None, stop: Sequence[str]) -> str:
    """The text of a row's generated ids, without the eos token that ended it and cut before a stop string."""
    if generated and eos is not None and generated[-1] == eos:
        generated = generated[:-1]
    text = tokenizer.decode(generated)
    cut = _first_stop(text, stop)
    return text if cut is None else text[:cut]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _stop_prefix_start(text: str, stop: Sequence[str]) -> int:
    """Index where a suffix of `text` begins that is a proper prefix of some stop string (len(text) if none)."""
    start = len(text)
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                start = min(start, len(text) - n)
                break
    return start


def check_new_tokens(max_new_tokens: int | None, model, default: int = 100,
                     flag: str = "--max-new-tokens") -> int:
    """The number of tokens to generate: `max_new_tokens`, or when None `default` capped at the model's context
    length. More than the context is refused: past it generation slides its window along, one full forward
    per token, for as long as asked."""
    context = model.config.context_length
    if max_new_tokens is None:
        return min(default, context)
    if max_new_tokens > context:
        raise UserError(f"{flag} {max_new_tokens}: more than the model's context length {context}; use at most "
                        f"{context}")
    return max_new_tokens
