"""Text inputs of an ExplainRequest (Inputs.tokens, Inputs.texts) -> padded token ids and their mask.

Every limit of the model's TextSpec is checked here, each refusal a field violation naming what
to fix: ids within the vocabulary, 1..max_length tokens per item (longer sequences are refused,
not cut), one mask value (0 or 1) per id with at least one real token, raw text within
max_text_bytes UTF-8 bytes and only for models with a tokenizer. Images are refused for text
models and token inputs for image models. Sequences of different lengths are padded at the end
with the model's pad id and masked.
"""
from __future__ import annotations

import torch

from service._proto import attribution_pb2 as pb
from workers.errors import FieldViolation
from workers.spec import ExplainSpec, ModelDescription

TEXT_SOURCES = ("tokens", "texts")
# Violations reported per field before the rest are summarized, so one message stays readable.
_MAX_ITEM_VIOLATIONS = 8


def declared_text_items(inputs: pb.Inputs) -> int:
    source = inputs.WhichOneof("source")
    if source == "tokens":
        return len(inputs.tokens.sequences)
    if source == "texts":
        return len(inputs.texts.texts)
    return 0


def image_inputs_refusal(model: ModelDescription, source: str) -> FieldViolation:
    """Why an image model refuses token inputs."""
    return FieldViolation(f"inputs.{source}", f"model {model.name!r} takes images (inputs.tensor or inputs.images); "
                                              "token ids and raw text are for text models (ModelInfo.modality TEXT)")


def text_inputs(inputs: pb.Inputs, model: ModelDescription, max_items: int,
                violations: list[FieldViolation]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Ids and mask `# (N, L)` int64 for a text model, or (None, None) with violations appended."""
    text = model.text
    source = inputs.WhichOneof("source")
    bad = violations.append
    if source not in TEXT_SOURCES:
        what = "sent no inputs" if source is None else f"sent inputs.{source}"
        bad(FieldViolation("inputs", f"model {model.name!r} is a text model and {what}: send inputs.tokens "
                                     "(token ids, one sequence per item)" + (" or inputs.texts (raw text)"
                                                                             if text.tokenizer is not None else "")))
        return None, None
    if inputs.space != pb.INPUT_SPACE_UNSPECIFIED:
        bad(FieldViolation("inputs.space", "applies to raw tensors only; leave it unset for text"))
    n = declared_text_items(inputs)
    if n == 0:
        bad(FieldViolation(f"inputs.{source}", "needs at least one item"))
        return None, None
    if n > max_items:
        bad(FieldViolation(f"inputs.{source}", f"has {n} items; at most {max_items} per request"))
        return None, None
    if source == "texts" and text.tokenizer is None:
        bad(FieldViolation("inputs.texts", f"model {model.name!r} has no tokenizer; send token ids in inputs.tokens"))
        return None, None
    found = len(violations)
    if source == "tokens":
        sequences = [_sequence(i, seq, text, violations) for i, seq in enumerate(inputs.tokens.sequences)]
    else:
        sequences = [_tokenize(i, raw, model, violations) for i, raw in enumerate(inputs.texts.texts)]
    if len(violations) > found + _MAX_ITEM_VIOLATIONS:
        del violations[found + _MAX_ITEM_VIOLATIONS:]
        bad(FieldViolation(f"inputs.{source}", "further items have problems too; fix the ones above first"))
    if len(violations) > found or any(s is None for s in sequences):
        return None, None
    return pad_sequences(sequences, text.pad_id)


def pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) pairs of any lengths -> ids and mask `# (N, L)` int64, padded at the end with pad_id / 0."""
    width = max(len(ids) for ids, _ in sequences)
    padded = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for i, (ids, real) in enumerate(sequences):
        padded[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
        mask[i, :len(ids)] = torch.as_tensor(real, dtype=torch.int64)
    return padded, mask


def _sequence(i: int, seq: pb.TokenSequence, text, violations: list[FieldViolation]):
    field = f"inputs.tokens.sequences[{i}]"
    count = len(seq.ids)  # checked before any copy: a huge sequence costs nothing to refuse
    if not 1 <= count <= text.max_length:
        violations.append(FieldViolation(f"{field}.ids", f"has {count} ids; 1..{text.max_length} "
                                                         "(TextSpec.max_length; longer sequences are not cut)"))
        return None
    if len(seq.attention_mask) > text.max_length:
        violations.append(FieldViolation(f"{field}.attention_mask", f"has {len(seq.attention_mask)} values for "
                                                                    f"{count} ids; give one per id"))
        return None
    ids, real = list(seq.ids), list(seq.attention_mask) or [1] * count
    out_of_range = [v for v in ids if not 0 <= v < text.vocab_size]
    if out_of_range:
        violations.append(FieldViolation(f"{field}.ids", f"ids {out_of_range[:5]} are outside the vocabulary "
                                                         f"[0, {text.vocab_size})"))
        return None
    if len(real) != len(ids):
        violations.append(FieldViolation(f"{field}.attention_mask", f"has {len(real)} values for {len(ids)} ids; "
                                                                    "give one per id, or none (all real)"))
        return None
    if any(v not in (0, 1) for v in real) or not any(real):
        violations.append(FieldViolation(f"{field}.attention_mask", "values must be 0 (padding) or 1 (a real "
                                                                    "token), with at least one 1"))
        return None
    return ids, real


def _tokenize(i: int, raw: str, model: ModelDescription, violations: list[FieldViolation]):
    text, field = model.text, f"inputs.texts.texts[{i}]"
    size = len(raw.encode("utf-8"))
    if size > text.max_text_bytes:
        violations.append(FieldViolation(field, f"has {size} UTF-8 bytes; at most {text.max_text_bytes} "
                                                "(TextSpec.max_text_bytes)"))
        return None
    ids = text.tokenizer.encode(raw)
    if not 1 <= len(ids) <= text.max_length:
        what = "has no tokens" if not ids else f"is {len(ids)} tokens long"
        violations.append(FieldViolation(field, f"{what}; 1..{text.max_length} tokens per item "
                                                "(TextSpec.max_length; longer texts are not cut)"))
        return None
    return ids, [1] * len(ids)


def item_input(spec: ExplainSpec, i: int) -> torch.Tensor:
    """Item i's input as hashed and stored: model space `# (C, H, W)`, or a text item's real token ids `# (L,)`."""
    if spec.attention_mask is not None:
        return spec.inputs[i][spec.attention_mask[i].bool()]
    return spec.inputs[i]


def modality_fields(model: ModelDescription) -> dict:
    """ModelInfo.modality and, for a text model, its text_spec (keyword arguments of pb.ModelInfo)."""
    if model.modality != "text" or model.text is None:
        return {"modality": pb.IMAGE}
    t = model.text
    return {"modality": pb.TEXT, "text_spec": pb.TextSpec(vocab_size=t.vocab_size, max_length=t.max_length,
                                                          pad_id=t.pad_id, tokenizer=t.tokenizer_name,
                                                          max_text_bytes=t.max_text_bytes)}
