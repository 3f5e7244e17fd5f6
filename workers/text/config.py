"""The `text:` section of a text model's config entry (`modality: text`).

    models:
      - name: reviews
        source: torchscript
        path: /models/reviews.pt
        modality: text
        text: {embedding: embedding, vocab_size: 30522, max_length: 128, pad_id: 0,
               tokenizer: /models/reviews-vocab.json, max_text_bytes: 4096}

`embedding` is the module path (a key of `dict(model.named_modules())`) whose output the
attributions are taken at; `tokenizer` a vocabulary file in the format of
`workers/text/tokenizer.py` ("" = the model takes token ids only). The text demo
(`source: demo`, `modality: text`) brings its own embedding name, vocabulary and lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

from workers.schema import check

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class TextConfig:
    """A text model's embedding module, vocabulary, lengths and tokenizer file.

    embedding: module path of the embedding layer ("" = `embedding`).
    vocab_size: ids are 0..vocab_size-1; 0 = the embedding's own row count.
    max_length: tokens per item after tokenization (longer sequences are refused, not cut).
    pad_id: the id variable-length sequences are padded with (and masked).
    tokenizer: vocabulary file for raw text (Inputs.texts); "" = token ids only.
    max_text_bytes: UTF-8 bytes per raw text.
    """

    embedding: str = ""
    vocab_size: int = 0
    max_length: int = 128
    pad_id: int = 0
    tokenizer: str = ""
    max_text_bytes: int = 4096

    def __post_init__(self) -> None:
        check(self.vocab_size >= 0, "text.vocab_size", "must be >= 0 (0: the embedding's row count)")
        check(1 <= self.max_length <= 8192, "text.max_length", "must be 1..8192")
        check(self.pad_id >= 0 and (self.vocab_size == 0 or self.pad_id < self.vocab_size), "text.pad_id",
              "must be an id of the vocabulary (0..vocab_size-1)")
        check(1 <= self.max_text_bytes <= 1 << 20, "text.max_text_bytes", "must be 1..1048576")

    @property
    def embedding_module(self) -> str:
        return self.embedding or "embedding"


@dataclass(frozen=True)
class TextInfo:
    """What the front door needs of a text model (ModelInfo.text_spec) and its tokenizer, if any
    (a `workers.text.tokenizer.Tokenizer`, which tokenizes Inputs.texts at the front door)."""

    vocab_size: int
    max_length: int
    pad_id: int
    max_text_bytes: int
    tokenizer_name: str = ""
    tokenizer: object = None
