"""Tokenizers as the frontend sees them: text -> ids for prompts, ids -> text deltas for outputs.

The protocol is shaped for HF-style tokenizers (a vLLM adapter will implement it): detokenization is incremental and
per request, seeded with the prompt ids, because a token's text can depend on its neighbours (byte-level BPE, leading
spaces). ``SimTokenizer`` serves the simulated engine: deterministic in every process, so tests and benchmarks are
reproducible, with readable words so HTTP clients see text. ``HfTokenizer`` is a real model's tokenizer (a Hugging
Face tokenizer directory, as vLLM loads it), used with ``--engine vllm``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pyllumnix.control_plane.frontend.errors import InvalidRequestError

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
        # id -> its text, filled as ids are first decoded (at most vocab_size short strings): detokenizing runs once per
        # streamed token, and spelling a word costs ~10x a dict lookup.
        self._words: dict[int, str] = {}

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
        text = self._words.get(token_id)
        if text is None:
            text = self._spell(token_id)
            if 0 <= token_id < self._vocab_size:
                self._words[token_id] = text
        return text

    def _spell(self, token_id: int) -> str:
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
        word = self._tokenizer.word
        if len(token_ids) == 1:  # one token per engine step: the common case
            return word(token_ids[0])
        return "".join([word(t) for t in token_ids])

    def flush(self) -> str:
        return ""


# Prompt tokens a new request's detokenizer starts from: enough context for a leading space or a multi-byte character
# that began in the prompt (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class HfTokenizer:
    """A Hugging Face tokenizer directory (``tokenizer.json`` etc., usually the model's own directory).

    Loaded with ``transformers.AutoTokenizer`` (fast tokenizers only, offline); decoding goes straight to the Rust
    ``tokenizers`` backend because detokenization runs once per output token.
    """

    # The fast tokenizer's encode runs in Rust with the GIL released: the frontend encodes on its worker thread.
    encodes_without_gil = True

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        tok = AutoTokenizer.from_pretrained(str(self.path), use_fast=True, local_files_only=True)
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{path}: only fast (tokenizer.json) tokenizers are supported")
        self._tok: Any = tok
        self._backend: Any = tok.backend_tokenizer
        self._bos_text: str | None = tok.bos_token if isinstance(tok.bos_token, str) else None
        config = _read_json(self.path / "config.json")
        # The model's embedding may be larger than the tokenizer (padding rows): ids up to either are valid.
        self._vocab_size = max(len(tok), int(config.get("vocab_size", 0) or 0))
        eos = tok.eos_token_id
        if eos is None:
            eos = _first_int(_read_json(self.path / "generation_config.json").get("eos_token_id"))
        self._eos: int | None = eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids as vLLM's server makes them: special tokens (BOS) added, unless the text already starts with
        BOS (a rendered chat template usually does), so it is never doubled."""
        add_special = not (self._bos_text and text.startswith(self._bos_text))
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """All of ``token_ids`` at once, special tokens skipped (what the incremental deltas add up to)."""
        text: str = self._backend.decode(list(token_ids), skip_special_tokens=True)
        return text

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str | None:
        """The prompt per the tokenizer's own chat template (with the assistant's generation prompt), or None when it
        has none (the frontend then uses its simple template). Content given as text parts is joined first."""
        if not self.has_chat_template:
            return None
        from jinja2 import TemplateError  # transformers' dependency, as this tokenizer is

        plain = [{**m, "content": _text_content(m.get("content"))} for m in messages]
        try:
            text: str = self._tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        except (TemplateError, TypeError, ValueError) as exc:
            # Many models' templates refuse conversations they were not trained on (``raise_exception`` for roles
            # that do not alternate, a system message, ...), or fail on a field of an unexpected type: the client's
            # input, so a 400 naming the reason, not a server error.
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
        return text

    def detokenizer(self, prompt_token_ids: Sequence[int]) -> IncrementalDetokenizer:
        return HfDetokenizer(self._backend, prompt_token_ids)


class HfDetokenizer:
    """Incremental detokenization with a prefix and a read offset (vLLM's technique).

    Text is the decode of a short window of ids: ``prefix_offset..read_offset`` is text already emitted (context, so a
    token's leading space or merged bytes decode as in the full sequence), ``read_offset..`` is new. A delta is emitted
    only when the window's text grew and does not end in U+FFFD (an incomplete UTF-8 character: its remaining bytes
    come with later tokens); then both offsets move forward. ``flush`` emits whatever is still held back.
    """

    def __init__(self, backend: Any, prompt_token_ids: Sequence[int]) -> None:
        self._backend = backend
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        text: str = self._backend.decode(self._ids[start:end], skip_special_tokens=True)
        return text

    def add(self, token_ids: Sequence[int]) -> str:
        out: list[str] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            prefix_text = self._decode(self._prefix_offset, self._read_offset)
            new_text = self._decode(self._prefix_offset)
            if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
                out.append(new_text[len(prefix_text) :])
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
        self._trim()
        return "".join(out)

    def _trim(self) -> None:
        """Drops ids before the prefix offset: they are never decoded again (keeps each step O(window))."""
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def flush(self) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        self._trim()
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_int(value: object) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and isinstance(value[0], int):
        return value[0]
    return None


def _text_content(content: object) -> object:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content
