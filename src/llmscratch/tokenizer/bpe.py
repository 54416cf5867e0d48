"""Byte-level byte-pair encoding written from scratch: training and encoding in plain Python.

BPE (Sennrich et al. 2016, on bytes as in GPT-2, Radford et al. 2019) starts from the 256 single bytes and
repeatedly fuses the most frequent adjacent pair of tokens into a new token. Text is first cut into "words" by a
regex (`GPT2_PATTERN`), and merges never cross a word boundary, so training only needs each distinct word and
how often it occurs.

Ids: byte b has id b, the k-th new token has id 256 + k, special tokens come after. The id doubles as the merge
priority ("rank"); encoding repeatedly fuses the adjacent pair whose concatenation has the lowest rank, exactly
as tiktoken does, so one encoder serves trained vocabularies and OpenAI's GPT-2 (whose byte ids differ) alike,
and ``to_tiktoken()`` runs the same vocabulary at Rust speed.
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import regex
from tqdm import tqdm

from llmscratch.errors import UserError
from llmscratch.tokenizer.base import RankedBPE
from llmscratch.tokenizer.gpt2 import GPT2_PATTERN, read_gpt2_files
from llmscratch.tokenizer.vocab import ids_to_list, resolve_allowed_special, unknown_id_error

Pair = tuple[int, int]

_NO_MERGE = sys.maxsize
_LONG_WORD = 64  # bytes; longer words take the O(n log n) merge loop (a 10 KB run of "=" would take seconds)
_CACHE_LIMIT = 200_000  # distinct words remembered by `encode`; natural text repeats a few thousand


def count_words(
    texts: str | Iterable[str], pattern: str = GPT2_PATTERN, special_tokens: Collection[str] = ()
) -> dict[bytes, int]:
    """How often each pre-tokenized word (as UTF-8 bytes) occurs. Special-token strings are cut out first, so
    that a corpus separated by ``<|endoftext|>`` does not teach merges of the separator itself."""
    if isinstance(texts, str):
        texts = [texts]
    word_re = regex.compile(pattern)
    special_re = _alternation(special_tokens)
    counts: Counter[str] = Counter()
    for text in texts:
        text = _valid_unicode(text)
        for chunk in special_re.split(text) if special_re else (text,):
            counts.update(word_re.findall(chunk))
    return {word.encode("utf-8"): n for word, n in counts.items()}


class _PairIndex:
    """The training words as lists of token ids, with the count of every adjacent pair (occurrences in each
    word times the word's frequency) and the words that contain it, kept up to date as merges are applied."""

    def __init__(self, word_counts: Mapping[bytes, int]):
        self.words: list[list[int]] = []
        self.freqs: list[int] = []
        for word, freq in word_counts.items():
            if len(word) > 1:  # a one-byte word has no pair to merge
                self.words.append(list(word))
                self.freqs.append(freq)
        self.counts: dict[Pair, int] = {}
        self.where: dict[Pair, set[int]] = {}  # pair -> indices of the words that contain it
        for index, (ids, freq) in enumerate(zip(self.words, self.freqs)):
            for pair in pairwise(ids):
                self.counts[pair] = self.counts.get(pair, 0) + freq
                self.where.setdefault(pair, set()).add(index)

    def merge(self, a: int, b: int, new_id: int) -> list[tuple[Pair, int]]:
        """Replace every (a, b) by `new_id` in the words that contain it, revisiting only those and adjusting
        pair counts by difference. Returns the pairs whose count grew, with their new count (a pair whose count
        shrank keeps a stale heap entry, caught when popped; one that vanished is forgotten)."""
        before: dict[Pair, int] = {}  # count of every pair touched by this merge, before it
        for index in self.where.pop((a, b)):
            self._merge_word(index, a, b, new_id, before)
        grown = []
        for pair, old_count in before.items():
            count = self.counts[pair]
            if count == 0:
                del self.counts[pair]
                self.where.pop(pair, None)
            elif count > old_count:
                grown.append((pair, count))
        return grown

    def _merge_word(self, index: int, a: int, b: int, new_id: int, before: dict[Pair, int]) -> None:
        old = self.words[index]
        new = _merge_pair(old, a, b, new_id)
        self.words[index] = new
        freq = self.freqs[index]
        old_pairs = list(pairwise(old))
        new_pairs = list(pairwise(new))
        for pair in old_pairs:
            if pair not in before:
                before[pair] = self.counts[pair]
            self.counts[pair] -= freq
        for pair in new_pairs:
            if pair not in before:
                before[pair] = self.counts.get(pair, 0)
            self.counts[pair] = self.counts.get(pair, 0) + freq
        for pair in set(old_pairs).difference(new_pairs):
            if pair != (a, b):  # already popped by `merge`
                self.where[pair].discard(index)
        for pair in new_pairs:
            self.where.setdefault(pair, set()).add(index)


def learn_merges(
    word_counts: Mapping[bytes, int], vocab_size: int, progress: bool = False
) -> list[tuple[bytes, bytes]]:
    """The merges, in order, that grow the 256 byte tokens to `vocab_size` tokens (fewer if pairs run out).

    Each step merges the most frequent adjacent pair, counting a pair once per occurrence in each word times
    the word's frequency. Ties go to the pair whose (left bytes, right bytes) is lexicographically smallest,
    so training is deterministic. Should a merge produce bytes that are already a token, that token's id is
    reused and no token is added, keeping one id per byte string as tiktoken-style ranks require.

    Cost: counting is done once; after a merge only the words containing the merged pair are revisited, and
    their pair counts adjusted by difference (`_PairIndex`). The next pair comes from a max-heap with lazy
    deletion: an entry whose count no longer matches the live count is stale, and is re-pushed with the live
    count when popped.
    """
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    token_ids: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}
    index = _PairIndex(word_counts)
    # heapq is a min-heap: negate the count; the bytes make ties deterministic; the ids ride along.
    heap = [(-count, tokens[a], tokens[b], a, b) for (a, b), count in index.counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    bar = tqdm(total=max(vocab_size - 256, 0), desc="BPE merges", unit="tok", disable=not progress)
    while len(tokens) < vocab_size and heap:
        neg_count, left, right, a, b = heapq.heappop(heap)
        live = index.counts.get((a, b), 0)
        if live != -neg_count:
            if live > 0:
                heapq.heappush(heap, (-live, left, right, a, b))
            continue
        merged = left + right
        new_id = token_ids.get(merged)
        if new_id is None:
            new_id = len(tokens)
            tokens.append(merged)
            token_ids[merged] = new_id
            bar.update(1)
        merges.append((left, right))
        for (x, y), count in index.merge(a, b, new_id):
            heapq.heappush(heap, (-count, tokens[x], tokens[y], x, y))
    bar.close()
    return merges


def _merge_pair(ids: list[int], a: int, b: int, new_id: int) -> list[int]:
    """`ids` with every non-overlapping (a, b), scanned left to right, replaced by `new_id`."""
    out = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _alternation(strings: Collection[str]) -> regex.Pattern | None:
    # Longest first, so that a special token which is a prefix of another cannot shadow it.
    if not strings:
        return None
    return regex.compile("|".join(regex.escape(s) for s in sorted(strings, key=len, reverse=True)))


class BPETokenizer(RankedBPE):
    """Byte-level BPE in pure Python: readable, trainable, and id-for-id equal to its ``to_tiktoken()``.

    ranks: token bytes -> id (= merge priority). special_tokens: string -> id. pattern: pre-tokenization regex.
    """

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> None:
        super().__init__(ranks, special_tokens, pattern, "BPETokenizer")
        self._word_re = regex.compile(pattern)
        self._id_to_bytes: list[bytes | None] = [None] * (max(self.ranks.values()) + 1)
        for token, token_id in self.ranks.items():
            self._id_to_bytes[token_id] = token
        self._cache: dict[str, list[int]] = {}
        self._special_res: dict[frozenset[str], regex.Pattern | None] = {}
        self._special_tokens_changed()

    def _special_tokens_changed(self) -> None:
        size = max(len(self._id_to_bytes), max(self.special_tokens.values(), default=-1) + 1)
        self._id_to_bytes += [None] * (size - len(self._id_to_bytes))
        for name, token_id in self.special_tokens.items():
            self._id_to_bytes[token_id] = name.encode("utf-8")
        self._special_res.clear()  # compiled for the old set of special tokens

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        pattern: str = GPT2_PATTERN,
        progress: bool = True,
    ) -> BPETokenizer:
        """Learn a vocabulary of `vocab_size` ids (256 bytes + merges + `special_tokens`) from `texts`.

        If the text runs out of pairs first, the vocabulary is smaller; special tokens still follow the merges.
        """
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
            raise UserError(f"special_tokens {special_tokens} must be distinct non-empty strings")
        if vocab_size < 256 + len(special_tokens):
            raise UserError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte tokens "
                f"+ {len(special_tokens)} special token(s); ask for at least {256 + len(special_tokens)}"
            )
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise UserError(
                f"pattern {pattern!r} is not a valid regex ({e}); GPT2_PATTERN is the usual one"
            ) from None
        word_counts = count_words(texts, pattern, special_tokens)
        merges = learn_merges(word_counts, vocab_size - len(special_tokens), progress=progress)
        ranks = {bytes([b]): b for b in range(256)}
        for left, right in merges:
            ranks.setdefault(left + right, len(ranks))
        specials = {name: len(ranks) + i for i, name in enumerate(special_tokens)}
        return cls(ranks, specials, pattern)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> BPETokenizer:
        """OpenAI's GPT-2 BPE from its released `encoder.json` and `vocab.bpe`; ids equal tiktoken's "gpt2"."""
        ranks, special_tokens = read_gpt2_files(encoder_json, vocab_bpe)
        return cls(ranks, special_tokens, GPT2_PATTERN)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    def encode(self, text: str, allowed_special: str | Collection[str] = "all") -> list[int]:
        allowed = resolve_allowed_special(allowed_special, self.special_tokens)
        text = _valid_unicode(text)
        if allowed not in self._special_res:
            self._special_res[allowed] = _alternation(allowed)
        special_re = self._special_res[allowed]
        if special_re is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in special_re.finditer(text):
            ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in self._word_re.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word.encode("utf-8"))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = word_ids
            ids += word_ids
        return ids

    def _encode_word(self, word: bytes) -> list[int]:
        """BPE on one pre-tokenized word: fuse the adjacent pair with the lowest-ranked concatenation, the
        leftmost on a tie, until no adjacent pair forms a known token (tiktoken's `byte_pair_merge`)."""
        ranks = self.ranks
        whole = ranks.get(word)
        if whole is not None:  # tiktoken takes a known word as one token without merging; so must we
            return [whole]
        if len(word) > _LONG_WORD:
            return self._encode_long_word(word)
        parts = [word[i : i + 1] for i in range(len(word))]
        # pair_ranks[i] = rank of parts[i] + parts[i + 1], kept in step with `parts` as they fuse.
        pair_ranks = [ranks.get(parts[i] + parts[i + 1], _NO_MERGE) for i in range(len(parts) - 1)]
        while pair_ranks:
            best = min(pair_ranks)
            if best == _NO_MERGE:
                break
            i = pair_ranks.index(best)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], _NO_MERGE)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], _NO_MERGE)
        return [ranks[p] for p in parts]

    def _encode_long_word(self, word: bytes) -> list[int]:
        """Same result as `_encode_word`, in O(n log n) instead of O(n^2): a heap of candidate merges keyed by
        (rank, start offset), so the pop is the lowest rank and, on a tie, the leftmost, as above.

        Parts are identified by their start offset into `word`; `end[s]` is where the part at s ends and
        `prev[s]` the start of the part before it. A heap entry is stale once its part was absorbed or its
        right neighbour changed; re-reading the rank of the current pair at that start detects both.
        """
        ranks, n = self.ranks, len(word)
        end = list(range(1, n + 1))
        prev = list(range(-1, n - 1))
        absorbed = [False] * n

        def pair_rank(start: int) -> int | None:
            middle = end[start]
            return ranks.get(word[start : end[middle]]) if middle < n else None

        heap = [(r, s) for s in range(n - 1) if (r := pair_rank(s)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, start = heapq.heappop(heap)
            if absorbed[start] or pair_rank(start) != rank:
                continue
            middle = end[start]
            absorbed[middle] = True
            end[start] = end[middle]
            if end[start] < n:
                prev[end[start]] = start
            for s in (start, prev[start]):
                if s >= 0 and (r := pair_rank(s)) is not None:
                    heapq.heappush(heap, (r, s))
        ids, start = [], 0
        while start < n:
            ids.append(ranks[word[start : end[start]]])
            start = end[start]
        return ids

    def decode(self, ids) -> str:
        ids = ids_to_list(ids, self.vocab_size)
        table = self._id_to_bytes
        pieces = [table[i] for i in ids]
        if None in pieces:
            raise unknown_id_error(ids[pieces.index(None)], self.vocab_size)
        return b"".join(pieces).decode("utf-8", errors="replace")  # type: ignore[arg-type]

    def to_tiktoken(self, name: str = "llmscratch-bpe"):
        """This vocabulary as a ``tiktoken.Encoding``: the same ids from tiktoken's Rust encoder."""
        import tiktoken

        return tiktoken.Encoding(
            name,
            pat_str=self.pattern,
            mergeable_ranks=dict(self.ranks),
            special_tokens=dict(self.special_tokens),
        )

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


def _valid_unicode(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Surrogates (e.g. from a broken JSON escape) cannot be UTF-8. Like tiktoken, and before the regex
        # split so the words match its words: join valid surrogate pairs, replace lone ones with U+FFFD.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
