"""Text models from files: a scripted model saved to a temp file, the tokenizer file format, config checks."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from torch import nn

from service.settings import ServiceConfig
from workers.config import AppConfig, ModelConfig
from workers.errors import InvalidArgument, ModelLoadError
from workers.kernels.text_gradients import TextGradientRequest, explain_text
from workers.models import load_model
from workers.text.config import TextConfig
from workers.text.demo import demo_tokenizer, make_sentences, train_text_demo
from workers.text.tokenizer import Tokenizer, load_tokenizer


class PaddedNet(nn.Module):
    """A tiny text model whose embedding has a padding row (the scripted path must skip it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.encoder = nn.Module()
        self.encoder.tokens = nn.Embedding(54, 8, padding_idx=0)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.encoder.tokens(ids)
        m = attention_mask.unsqueeze(-1).to(e.dtype)
        return self.head(torch.tanh((e * m).sum(dim=1)))


def _save_tokenizer(path) -> str:
    path.write_text(json.dumps(demo_tokenizer().to_json()))
    return str(path)


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "integrated_gradients"])
def test_a_scripted_text_model_explains_like_its_python_module(tmp_path, text_model, method):
    # The demo trained afresh (the same weights: deterministic) has no hook yet and scripts; the loaded one serves
    # as the Python reference.
    for module, embedding in ((train_text_demo(), "embedding"), (PaddedNet().eval(), "encoder.tokens")):
        path = tmp_path / f"{embedding}.pt"
        torch.jit.script(module).save(str(path))
        cfg = ModelConfig(name="scripted", source="torchscript", path=str(path), modality="text",
                          text=TextConfig(embedding=embedding, max_length=32,
                                          tokenizer=_save_tokenizer(tmp_path / "vocab.json")))
        scripted = load_model(cfg, "cpu")
        assert scripted.text.tokenizer.encode("rain") == [3] and scripted.online_methods == text_model.online_methods
        reference = text_model.text.forward if embedding == "embedding" else _eager_forward(module, embedding)
        batch = make_sentences(6, 4242)
        req = TextGradientRequest(batch.ids, batch.mask, batch.labels, method, samples=4, steps=8, seed=1,
                                  baseline="pad_token")
        (ours,) = explain_text(scripted.text.forward, [req])
        (ref,) = explain_text(reference, [req])
        torch.testing.assert_close(ours.scores, ref.scores, atol=1e-5, rtol=1e-4)
        assert float(ours.scores.abs().sum()) > 0


def _eager_forward(module, embedding):
    from workers.text.forward import TextForward

    return TextForward(module, embedding, "eager")


def test_load_errors_name_what_to_fix(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.script(PaddedNet().eval()).save(str(path))
    with pytest.raises(ModelLoadError, match="encoder.tokens"):
        load_model(ModelConfig(name="m", source="torchscript", path=str(path), modality="text",
                               text=TextConfig(embedding="tokens")), "cpu")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "wordpiece-lite/v1", "tokens": ["a"], "unk_token": "[UNK]"}))
    with pytest.raises(ModelLoadError, match="unk_token"):
        load_model(ModelConfig(name="m", source="torchscript", path=str(path), modality="text",
                               text=TextConfig(embedding="encoder.tokens", tokenizer=str(bad))), "cpu")
    with pytest.raises(InvalidArgument, match="demo .* or torchscript"):
        ModelConfig(name="m", source="torchvision", arch="resnet18", modality="text")
    with pytest.raises(InvalidArgument, match="modality: text"):
        ModelConfig(name="m", source="demo", text=TextConfig())
    with pytest.raises(InvalidArgument, match=r"models\[t\].text: unknown keys: max_lenght"):
        AppConfig.from_dict({"models": [{"name": "t", "source": "demo", "modality": "text",
                                         "text": {"max_lenght": 3}}]})


def test_tokenizer_file_format(tmp_path):
    tok = Tokenizer(tokens=("[PAD]", "[UNK]", "play", "##ing", "##ed", "guitar", "!"))
    assert tok.encode("Playing guitar!") == [2, 3, 5, 6]
    assert tok.encode("played xyz") == [2, 4, 1]
    assert tok.strings([2, 3, 99]) == ["play", "##ing", "[99]"]
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(tok.to_json()))
    loaded = load_tokenizer(path)
    assert loaded.tokens == tok.tokens and loaded.name == str(path)
    shipped = ServiceConfig.load(pathlib.Path(__file__).resolve().parents[3] / "deploy" / "config.text-demo.yaml")
    assert shipped.app.model("text-demo").modality == "text" and shipped.app.default == "demo"
