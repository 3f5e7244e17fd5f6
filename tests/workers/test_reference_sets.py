"""Model reference sets (Expected Gradients' baselines): tensor files, image folders, the demo's own, refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.io import encode_png

from workers.config import InputSpec, ModelConfig, model_config_from_dict
from workers.errors import InvalidArgument, ModelLoadError
from workers.reference_sets import DEMO_REFERENCE_IMAGES, demo_reference_set, load_reference_set, to_model_space

SPEC = InputSpec(height=16, width=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def pixels(n=3, seed=0):
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_tensor_files_load_in_model_space(tmp_path, suffix):
    images = pixels()
    path = tmp_path / f"refs{suffix}"
    if suffix == ".npy":
        np.save(path, images.numpy())
    elif suffix == ".pt":
        torch.save(images, path)
    else:
        save_file({"images": images}, str(path))
    refs = load_reference_set(str(path), SPEC, "m")
    assert torch.allclose(refs, to_model_space(images, SPEC))
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    assert torch.allclose(refs * torch.tensor(SPEC.std).view(1, 3, 1, 1) + mean, images, atol=1e-6)


def test_uint8_tensors_are_pixels_out_of_255(tmp_path):
    images = (pixels() * 255).round().to(torch.uint8)
    np.save(tmp_path / "refs.npy", images.numpy())
    refs = load_reference_set(str(tmp_path / "refs.npy"), SPEC, "m")
    assert torch.allclose(refs, to_model_space(images.float() / 255, SPEC))


def test_a_folder_of_images_is_stretched_to_the_input_size(tmp_path):
    for i in range(2):
        image = (torch.rand((3, 32, 24), generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8)
        (tmp_path / f"{i}.png").write_bytes(encode_png(image).numpy().tobytes())
    (tmp_path / "notes.txt").write_text("not an image")
    refs = load_reference_set(str(tmp_path), SPEC, "m")
    assert refs.shape == (2, 3, 16, 16) and bool(torch.isfinite(refs).all())


@pytest.mark.parametrize("images, words", [
    (torch.rand(2, 3, 8, 8), "(R, *(3, 16, 16))"),
    (torch.rand(2, 3, 16, 16) * 3, "[0, 1]"),
    (torch.ones(2, 3, 16, 16, dtype=torch.int32), "uint8"),
])
def test_unusable_sets_are_refused_saying_why(tmp_path, images, words):
    torch.save(images, tmp_path / "refs.pt")
    with pytest.raises(ModelLoadError) as refused:
        load_reference_set(str(tmp_path / "refs.pt"), SPEC, "m")
    assert "reference_set" in str(refused.value) and words in str(refused.value)


def test_missing_files_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_reference_set(str(tmp_path / "nope.npy"), SPEC, "m")
    with pytest.raises(ModelLoadError, match="no PNG or JPEG"):
        load_reference_set(str(tmp_path), SPEC, "m")


def test_the_config_refuses_an_unknown_kind_of_file():
    with pytest.raises(InvalidArgument) as refused:
        model_config_from_dict({"name": "m", "source": "demo", "reference_set": "/refs.csv"})
    assert refused.value.violations[0].field == "models[m].reference_set"
    assert ModelConfig(name="m", source="demo", reference_set="/r/refs.safetensors").reference_set


def test_the_demo_set_is_its_own_data_and_fixed_by_the_seed():
    spec = InputSpec(height=64, width=64, mean=(0.48,) * 3, std=(0.18,) * 3)
    a, b = demo_reference_set(0, spec), demo_reference_set(0, spec)
    assert a.shape == (DEMO_REFERENCE_IMAGES, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, demo_reference_set(1, spec))
