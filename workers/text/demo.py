"""The text demo model: a tiny classifier with a known answer.

Synthetic sentences of distractor words carry their label ONLY in one planted token (each class
has two cue words); the distractors are drawn independently of the label. So a faithful token
attribution puts its largest score on the planted token, which tests can check. The net is an
embedding, masked mean pooling and a two-layer head; it is trained in about a second on a CPU,
deterministically from `TextDemoConfig.seed` (explicit generators, one thread), and built in code
each time it is loaded (nothing is downloaded or cached).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.text.tokenizer import Tokenizer

PAD, UNK = "[PAD]", "[UNK]"
# Class k is said by either of CUES[k]; the labels name the cue words' topic.
TEXT_DEMO_LABELS: tuple[str, ...] = ("weather", "sport", "food", "music")
CUES: tuple[tuple[str, str], ...] = (("sunny", "rain"), ("goal", "tennis"), ("pizza", "bread"),
                                     ("guitar", "piano"))
DISTRACTORS: tuple[str, ...] = (
    "the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "on", "for", "with", "as", "we",
    "they", "today", "yesterday", "very", "really", "quite", "people", "city", "house", "car", "book",
    "friend", "morning", "evening", "walk", "talk", "see", "saw", "big", "small", "old", "new", "good",
    "bad", "there", ".", ",", "!", "?")
EMBEDDING = "embedding"      # the module attributions are taken at
MAX_LENGTH = 32
PAD_ID = 0


def demo_vocabulary() -> tuple[str, ...]:
    """[PAD] (id 0), [UNK] (id 1), the cue words, then the distractors."""
    return (PAD, UNK) + tuple(w for pair in CUES for w in pair) + DISTRACTORS


def demo_tokenizer() -> Tokenizer:
    return Tokenizer(tokens=demo_vocabulary(), unk_token=UNK, name="built-in")


@dataclass(frozen=True)
class TextDemoConfig:
    """Recipe of the text demo: sentences of min_words..max_words tokens, train_size of them
    (plus blank_fraction as many without a cue, trained towards the uniform distribution, so a
    class needs positive evidence from its cue), `steps` Adam steps of batch_size."""

    seed: int = 0
    dim: int = 16
    hidden: int = 32
    min_words: int = 4
    max_words: int = 16
    train_size: int = 2048
    blank_fraction: float = 0.25
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-2


@dataclass
class SentenceBatch:
    """Padded ids `# (N, L)`, mask `# (N, L)`, labels `# (N,)` (-1: no cue) and each cue's position `# (N,)`."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    cue_positions: torch.Tensor


def make_sentences(n: int, seed: int, config: TextDemoConfig = TextDemoConfig(), cue: bool = True,
                   length: int | None = None) -> SentenceBatch:
    """`n` sentences from `seed`: distractor words, one of which is replaced by a cue of the label
    (when `cue`); lengths uniform in min_words..max_words (or all `length`); padded with PAD_ID."""
    gen = torch.Generator().manual_seed(seed)
    vocab = demo_vocabulary()
    first_distractor = 2 + 2 * len(CUES)
    lengths = (torch.full((n,), length) if length is not None else
               torch.randint(config.min_words, config.max_words + 1, (n,), generator=gen))
    width = int(lengths.max())
    ids = torch.randint(first_distractor, len(vocab), (n, width), generator=gen)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    labels = torch.randint(0, len(CUES), (n,), generator=gen)
    which = torch.randint(0, 2, (n,), generator=gen)
    positions = (torch.rand(n, generator=gen) * lengths).long()
    if cue:
        ids[torch.arange(n), positions] = 2 + 2 * labels + which
    else:
        labels, positions = torch.full((n,), -1), torch.full((n,), -1)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID))
    return SentenceBatch(ids, mask, labels, positions)


class TextDemoNet(nn.Module):
    """Embedding -> masked mean over the tokens -> Linear, tanh -> Linear: logits `# (N, classes)`."""

    def __init__(self, vocab_size: int, classes: int, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.embedding(ids)  # (N, L, D)
        m = attention_mask.unsqueeze(-1).to(e.dtype)  # (N, L, 1)
        pooled = (e * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (N, D)
        return self.fc2(torch.tanh(self.fc1(pooled)))


def train_text_demo(config: TextDemoConfig = TextDemoConfig()) -> TextDemoNet:
    """The trained net in eval mode, parameters frozen; the same weights on every machine (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _train(config)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _train(config: TextDemoConfig) -> TextDemoNet:
    classes = len(CUES)
    data = make_sentences(config.train_size, config.seed, config)
    blank = make_sentences(round(config.blank_fraction * config.train_size), config.seed + 1_000_003, config,
                           cue=False)
    width = max(data.ids.shape[1], blank.ids.shape[1])
    ids = torch.cat([F.pad(data.ids, (0, width - data.ids.shape[1])), F.pad(blank.ids, (0, width - blank.ids.shape[1]))])
    mask = torch.cat([F.pad(data.mask, (0, width - data.mask.shape[1])),
                      F.pad(blank.mask, (0, width - blank.mask.shape[1]))])
    targets = torch.cat([F.one_hot(data.labels, classes).float(),
                         torch.full((blank.ids.shape[0], classes), 1.0 / classes)])
    gen = torch.Generator().manual_seed(config.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        model = TextDemoNet(len(demo_vocabulary()), classes, config.dim, config.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    for _ in range(config.steps):
        idx = torch.randint(0, ids.shape[0], (config.batch_size,), generator=gen)
        loss = F.cross_entropy(model(ids[idx], mask[idx]), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model
