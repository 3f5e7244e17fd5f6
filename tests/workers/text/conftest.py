"""The text demo model, trained once per session (about a second), and held-out sentences."""
from __future__ import annotations

import pytest
import torch

from workers.config import ModelConfig
from workers.models import LoadedModel, load_model
from workers.text.demo import SentenceBatch, make_sentences


@pytest.fixture(scope="session")
def text_model() -> LoadedModel:
    return load_model(ModelConfig(name="text-demo", source="demo", modality="text"), "cpu")


@pytest.fixture(scope="session")
def sentences() -> SentenceBatch:
    """200 held-out sentences (seeds far from the training ones), 4..16 words, padded."""
    return make_sentences(200, 20_011)


@pytest.fixture()
def forward(text_model):
    return text_model.text.forward


def targets_of(batch: SentenceBatch) -> torch.Tensor:
    return batch.labels.clone()
