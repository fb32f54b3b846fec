"""Tokenizers as the frontend sees them: text -> ids for prompts, ids -> text deltas for outputs.

The protocol is shaped for HF-style tokenizers (a vLLM adapter will implement it): detokenization is incremental and
per request, seeded with the prompt ids, because a token's text can depend on its neighbours (byte-level BPE, leading
spaces). ``SimTokenizer`` serves the simulated engine: deterministic in every process, so tests and benchmarks are
reproducible, with readable words so HTTP clients see text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Protocol

SIM_VOCAB_SIZE = 32_000
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "po", "la", "zu", "be", "ni", "go", "fa")
_PIECES = re.compile(r"\S+|\s+")
_CHARS_PER_TOKEN = 4


class IncrementalDetokenizer(Protocol):
    """Turns one request's generated ids into text, a delta at a time."""

    def add(self, token_ids: Sequence[int]) -> str:
        """Text contributed by ``token_ids`` (may hold back text until later tokens complete it)."""
        ...

    def flush(self) -> str:
        """Whatever is still held back; called once when the request finishes."""
        ...


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def detokenizer(self, prompt_token_ids: Sequence[int]) -> IncrementalDetokenizer: ...


class SimTokenizer:
    """Deterministic stand-in: about one token per 4 characters of prompt; each id decodes to a short word.

    Ids 0..2 are special (unk, bos, eos) and decode to nothing; every other id decodes to " " + a word spelled from its
    base-16 digits as syllables, so distinct ids read as distinct words.
    """

    UNK, BOS, EOS = 0, 1, 2
    NUM_SPECIAL = 3

    def __init__(self, vocab_size: int = SIM_VOCAB_SIZE) -> None:
        if vocab_size <= self.NUM_SPECIAL:
            raise ValueError(f"vocab_size must exceed {self.NUM_SPECIAL}")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.EOS

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for match in _PIECES.finditer(text):
            piece = match.group()
            for start in range(0, len(piece), _CHARS_PER_TOKEN):
                ids.append(self._piece_id(piece[start : start + _CHARS_PER_TOKEN]))
        return ids

    def _piece_id(self, piece: str) -> int:
        digest = hashlib.blake2b(piece.encode(), digest_size=8).digest()
        return self.NUM_SPECIAL + int.from_bytes(digest, "little") % (self._vocab_size - self.NUM_SPECIAL)

    def word(self, token_id: int) -> str:
        """The text of one id ("" for special or out-of-vocabulary ids)."""
        if token_id < self.NUM_SPECIAL or token_id >= self._vocab_size:
            return ""
        digits: list[str] = []
        n = token_id
        while n:
            n, d = divmod(n, len(_SYLLABLES))
            digits.append(_SYLLABLES[d])
        while len(digits) < 2:
            digits.append(_SYLLABLES[0])
        return " " + "".join(reversed(digits))

    def detokenizer(self, prompt_token_ids: Sequence[int]) -> IncrementalDetokenizer:
        return _SimDetokenizer(self)


class _SimDetokenizer:
    def __init__(self, tokenizer: SimTokenizer) -> None:
        self._tokenizer = tokenizer

    def add(self, token_ids: Sequence[int]) -> str:
        return "".join(self._tokenizer.word(t) for t in token_ids)

    def flush(self) -> str:
        return ""
