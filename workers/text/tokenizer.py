"""A small self-contained tokenizer: a JSON vocabulary, words split on whitespace and punctuation,
each word looked up whole or as WordPiece-style pieces.

The file format (UTF-8 JSON)::

    {"format": "wordpiece-lite/v1",
     "tokens": ["[PAD]", "[UNK]", "the", "cat", "##s", ...],   # id = position in the list
     "unk_token": "[UNK]",            # must be in `tokens`
     "lowercase": true,               # optional, default true
     "continuation_prefix": "##"}     # optional, default "##"

Tokenization: the text is lowercased (when `lowercase`), then split into words, each a run of
letters/digits/underscore or a single other non-space character (`\\w+|[^\\w\\s]`). A word in the
vocabulary is one token; otherwise it is split greedily, longest match first, into a first piece
and continuation pieces (`continuation_prefix` + piece) from the vocabulary; a word that cannot be
split that way becomes `unk_token`. Nothing is cut: a text longer than the model's max_length is
refused by the front door.
"""
from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field

from workers.errors import ModelLoadError

FORMAT = "wordpiece-lite/v1"
_WORD = re.compile(r"\w+|[^\w\s]")
# Longest piece tried when splitting a word (long unknown words become unk quickly).
_MAX_WORD_CHARS = 100


@dataclass(frozen=True)
class Tokenizer:
    """A vocabulary and its tokenization rule; picklable, so the front door can hold it."""

    tokens: tuple[str, ...]
    unk_token: str = "[UNK]"
    lowercase: bool = True
    continuation_prefix: str = "##"
    name: str = ""                       # what ModelInfo.text_spec.tokenizer says (the file, or "built-in")
    _ids: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("the vocabulary repeats tokens")
        if self.unk_token not in self.tokens:
            raise ValueError(f"unk_token {self.unk_token!r} is not in the vocabulary")
        self._ids.update({token: i for i, token in enumerate(self.tokens)})

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        return self._ids[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (possibly empty)."""
        ids: list[int] = []
        unk = self._ids[self.unk_token]
        for word in _WORD.findall(text.lower() if self.lowercase else text):
            whole = self._ids.get(word)
            ids.extend([whole] if whole is not None else self._pieces(word) or [unk])
        return ids

    def _pieces(self, word: str) -> list[int]:
        if len(word) > _MAX_WORD_CHARS:
            return []
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.continuation_prefix + word[start:end]
                found = self._ids.get(piece)
                if found is not None:
                    pieces.append(found)
                    start = end
                    break
            else:
                return []
        return pieces

    def strings(self, ids: list[int]) -> list[str]:
        """The vocabulary's string of each id (`[id]` for an id outside it)."""
        return [self.tokens[i] if 0 <= i < len(self.tokens) else f"[{i}]" for i in ids]

    def to_json(self) -> dict:
        return {"format": FORMAT, "tokens": list(self.tokens), "unk_token": self.unk_token,
                "lowercase": self.lowercase, "continuation_prefix": self.continuation_prefix}


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """A tokenizer file (the format above); `ModelLoadError` says what is wrong with it."""
    path = pathlib.Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"tokenizer {path}: cannot read it as UTF-8 JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ModelLoadError(f"tokenizer {path}: expected a JSON object with \"format\": \"{FORMAT}\"")
    tokens = raw.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise ModelLoadError(f"tokenizer {path}: \"tokens\" must be a non-empty list of non-empty strings")
    try:
        return Tokenizer(tokens=tuple(tokens), unk_token=str(raw.get("unk_token", "[UNK]")),
                         lowercase=bool(raw.get("lowercase", True)),
                         continuation_prefix=str(raw.get("continuation_prefix", "##")), name=str(path))
    except ValueError as exc:
        raise ModelLoadError(f"tokenizer {path}: {exc}") from None
