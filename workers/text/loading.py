"""Loading a configured text model: the demo (built in code) or a TorchScript file.

The model must take `(ids, attention_mask)`, both `# (N, L)` int64, and return logits
`# (N, classes)`; its embedding module is found by name (`text.embedding`) among its submodules,
a scripted module's included. One probe forward checks the contract and reads the class count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import InputSpec, ModelConfig
from workers.errors import ModelLoadError
from workers.text.config import TextConfig, TextInfo
from workers.text.forward import TextForward
from workers.text.tokenizer import Tokenizer, load_tokenizer


@dataclass
class TextModel:
    """A loaded text model's embedding-level forward, vocabulary, lengths and tokenizer."""

    forward: TextForward
    vocab_size: int
    max_length: int
    pad_id: int
    max_text_bytes: int
    tokenizer: Tokenizer | None = None

    def info(self) -> TextInfo:
        return TextInfo(vocab_size=self.vocab_size, max_length=self.max_length, pad_id=self.pad_id,
                        max_text_bytes=self.max_text_bytes,
                        tokenizer_name=self.tokenizer.name if self.tokenizer is not None else "",
                        tokenizer=self.tokenizer)


def load_text_model(cfg: ModelConfig, device: torch.device):
    """Builds, freezes and checks one text model on `device`: a `workers.models.LoadedModel` with `.text` set."""
    from workers.models import LoadedModel, _build_from_file, sha256_state

    text = cfg.text or TextConfig()
    labels = cfg.labels
    if cfg.source == "demo":
        from workers.text import demo

        module = demo.train_text_demo(demo.TextDemoConfig(seed=cfg.seed))
        version = sha256_state(module)
        tokenizer: Tokenizer | None = demo.demo_tokenizer()
        if cfg.text is None:
            text = TextConfig(embedding=demo.EMBEDDING, max_length=demo.MAX_LENGTH, pad_id=demo.PAD_ID)
        labels = labels or demo.TEXT_DEMO_LABELS
    else:
        module, version = _build_from_file(cfg, False)
        tokenizer = load_tokenizer(text.tokenizer) if text.tokenizer else None
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    module.to(device)
    forward = TextForward(module, text.embedding_module, cfg.name)
    rows = getattr(forward.embedding, "num_embeddings", None)
    vocab = text.vocab_size or (int(rows) if rows is not None else 0)
    if not vocab:
        raise ModelLoadError(f"model {cfg.name!r}: set text.vocab_size (the embedding does not say its row count)")
    if rows is not None and vocab > int(rows):
        raise ModelLoadError(f"model {cfg.name!r}: text.vocab_size {vocab} exceeds the embedding's {rows} rows")
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ModelLoadError(f"model {cfg.name!r}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                             f"vocabulary size {vocab}")
    if not 0 <= text.pad_id < vocab:
        raise ModelLoadError(f"model {cfg.name!r}: text.pad_id {text.pad_id} is not an id below {vocab}")
    num_classes = _probe(forward, cfg, text.pad_id, device)
    if labels and len(labels) != num_classes:
        raise ModelLoadError(f"model {cfg.name!r}: {len(labels)} labels for {num_classes} classes")
    loaded = LoadedModel(name=cfg.name, module=module, spec=InputSpec(), num_classes=num_classes, version=version,
                         device=device, labels=tuple(labels))
    loaded.text = TextModel(forward, vocab, text.max_length, text.pad_id, text.max_text_bytes, tokenizer)
    return loaded


def _probe(forward: TextForward, cfg: ModelConfig, pad_id: int, device: torch.device) -> int:
    """One forward of two short sequences (the second padded), plain and with the embedding replaced."""
    ids = torch.tensor([[pad_id, pad_id], [pad_id, pad_id]], device=device)
    mask = torch.tensor([[1, 1], [1, 0]], device=device)
    try:
        with torch.no_grad():
            out = forward.module(ids, mask)
            replaced = forward.logits(forward.embed(ids), ids, mask)
    except Exception as exc:  # any failure means the model does not follow the text contract
        raise ModelLoadError(f"model {cfg.name!r} fails on token ids and a mask shaped (2, 2): {exc}; a text model "
                             "takes (ids, attention_mask), both (N, L) int64, and returns logits (N, classes)") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        raise ModelLoadError(f"model {cfg.name!r} must return logits (N, classes), got {getattr(out, 'shape', out)}")
    if cfg.num_classes and out.shape[1] != cfg.num_classes:
        raise ModelLoadError(f"model {cfg.name!r}: config says {cfg.num_classes} classes, model gives {out.shape[1]}")
    if not torch.allclose(out.float(), replaced.float(), rtol=1e-4, atol=1e-5):
        raise ModelLoadError(f"model {cfg.name!r}: replacing the output of {forward.embedding_name!r} by itself "
                             "changes the logits, so attributions there would be wrong; the model must read its "
                             "ids only through that embedding module")
    return int(out.shape[1])
