"""The demo model and its synthetic watermark data set: the known answer others test against."""
from __future__ import annotations

import logging
import pathlib
import re

import pytest
import torch
from torch import nn

from workers import demo
from workers.demo import (DEMO_CAM_LAYER, DEMO_CAM_LAYERS, DEMO_LABELS, DemoConfig, DemoNet, WatermarkBatch,
                          load_or_build_demo, make_watermark_dataset, to_model_space, watermark_template)
from workers.errors import InvalidArgument

# Seconds, not minutes: the cache tests train this recipe for real.
TINY = DemoConfig(train_size=64, epochs=1)


def pointing_hits(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, H, W) saliency maps, (N, 4) boxes -> (N,) bool: argmax inside the box."""
    flat = maps.flatten(1).argmax(dim=1)
    row, col = flat // maps.shape[-1], flat % maps.shape[-1]
    return (row >= boxes[:, 0]) & (row < boxes[:, 2]) & (col >= boxes[:, 1]) & (col < boxes[:, 3])


# --- the data set -----------------------------------------------------------------------------------------


def test_dataset_is_a_function_of_the_seed() -> None:
    first, again = make_watermark_dataset(32, seed=5), make_watermark_dataset(32, seed=5)
    torch.manual_seed(123)  # the global RNG must not matter
    other = make_watermark_dataset(32, seed=6)
    for name in ("images", "labels", "boxes"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.images, other.images)
    assert not torch.equal(first.boxes, other.boxes)


def test_dataset_shapes_dtypes_and_range(demo_heldout: WatermarkBatch, demo_config: DemoConfig) -> None:
    n, size = len(demo_heldout), demo_config.image_size
    assert demo_heldout.images.shape == (n, 3, size, size) and demo_heldout.images.dtype == torch.float32
    assert demo_heldout.labels.shape == (n,) and demo_heldout.labels.dtype == torch.int64
    assert demo_heldout.boxes.shape == (n, 4) and demo_heldout.boxes.dtype == torch.int64
    assert 0.0 <= demo_heldout.images.min() and demo_heldout.images.max() <= 1.0
    assert set(demo_heldout.labels.tolist()) == set(range(demo_config.num_classes))


def test_boxes_lie_inside_the_image(demo_heldout: WatermarkBatch, demo_config: DemoConfig) -> None:
    top, left, bottom, right = demo_heldout.boxes.unbind(dim=1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (bottom <= demo_config.image_size).all() and (right <= demo_config.image_size).all()
    assert ((bottom - top) == demo_config.patch_size).all() and ((right - left) == demo_config.patch_size).all()


def test_the_watermark_is_where_the_box_says(demo_heldout: WatermarkBatch, demo_config: DemoConfig) -> None:
    p = demo_config.patch_size
    crops = torch.stack([img[:, t:b, l:r].mean(dim=0) for img, (t, l, b, r)
                         in zip(demo_heldout.images, demo_heldout.boxes.tolist())])  # (N, p, p)
    templates = torch.stack([watermark_template(k, p) for k in range(demo_config.num_classes)])  # (K, p, p)
    corr = _pearson(crops.flatten(1), templates.flatten(1))  # (N, K)
    assert torch.equal(corr.argmax(dim=1), demo_heldout.labels)
    assert corr.max(dim=1).values.min() > 0.9


def test_the_label_lives_only_in_the_box(demo_config: DemoConfig) -> None:
    """A nearest-centroid probe reads the label from the box, and gets chance from the rest."""
    train, test = make_watermark_dataset(400, 101), make_watermark_dataset(400, 202)

    def outside_colour_stats(batch: WatermarkBatch) -> torch.Tensor:  # (N, 6): mean, std per channel
        outside = (~_box_masks(batch.boxes, batch.images.shape[-1])).float()  # (N, 1, H, W)
        count = outside.sum(dim=(2, 3))
        mean = (batch.images * outside).sum(dim=(2, 3)) / count  # (N, 3)
        var = ((batch.images - mean[..., None, None]) ** 2 * outside).sum(dim=(2, 3)) / count
        return torch.cat([mean, var.sqrt()], dim=1)

    def box_pixels(batch: WatermarkBatch) -> torch.Tensor:  # (N, 3 * p * p)
        return torch.stack([img[:, t:b, l:r].flatten() for img, (t, l, b, r)
                            in zip(batch.images, batch.boxes.tolist())])

    chance = 1.0 / demo_config.num_classes
    assert _nearest_centroid_accuracy(outside_colour_stats, train, test) < chance + 0.1
    assert _nearest_centroid_accuracy(box_pixels, train, test) > 0.95


def test_bad_arguments_are_typed_errors() -> None:
    with pytest.raises(InvalidArgument):
        make_watermark_dataset(0, seed=0)
    with pytest.raises(InvalidArgument):
        DemoConfig(num_classes=len(DEMO_LABELS) + 1)
    with pytest.raises(InvalidArgument):
        DemoConfig(patch_size=7)


# --- the model ----------------------------------------------------------------------------------------------


def test_heldout_accuracy(demo_model: DemoNet, demo_heldout: WatermarkBatch,
                          demo_heldout_inputs: torch.Tensor) -> None:
    with torch.no_grad():
        predicted = demo_model(demo_heldout_inputs).argmax(dim=1)
    assert (predicted == demo_heldout.labels).float().mean().item() >= 0.98


def test_model_is_frozen_and_hook_friendly(demo_model: DemoNet, demo_heldout_inputs: torch.Tensor) -> None:
    assert not demo_model.training
    assert not any(p.requires_grad for p in demo_model.parameters())
    modules = dict(demo_model.named_modules())
    assert not any(getattr(m, "inplace", False) for m in modules.values())
    assert not any(isinstance(m, nn.Dropout) for m in modules.values())
    assert DEMO_CAM_LAYER in DEMO_CAM_LAYERS
    shapes = {}
    hooks = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
             for name in DEMO_CAM_LAYERS]
    try:
        with torch.no_grad():
            logits = demo_model(demo_heldout_inputs[:2])
    finally:
        for hook in hooks:
            hook.remove()
    assert logits.shape == (2, len(DEMO_LABELS))
    assert all(shape[0] == 2 and shape[2] >= 16 and shape[3] >= 16 for shape in shapes.values()), shapes


def test_vanilla_gradient_points_at_the_watermark(demo_model: DemoNet, demo_heldout: WatermarkBatch,
                                                  demo_heldout_inputs: torch.Tensor) -> None:
    inputs = demo_heldout_inputs.clone().requires_grad_(True)
    score = demo_model(inputs).gather(1, demo_heldout.labels[:, None]).sum()
    (grad,) = torch.autograd.grad(score, inputs)
    saliency = grad.abs().amax(dim=1)  # (N, H, W)
    assert pointing_hits(saliency, demo_heldout.boxes).float().mean().item() >= 0.9


def test_training_is_deterministic_and_ignores_the_global_rng() -> None:
    torch.manual_seed(1)
    first = demo.train_demo_model(TINY)
    torch.manual_seed(2)
    second = demo.train_demo_model(TINY)
    assert not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


# --- the cache ----------------------------------------------------------------------------------------------


def test_cache_hit_loads_without_training(demo_model: DemoNet, demo_cache_dir: pathlib.Path,
                                          demo_config: DemoConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "train_demo_model", _must_not_train)
    model, path = load_or_build_demo(demo_cache_dir, demo_config)
    assert path == demo_cache_dir / f"demo-{demo_config.cache_key()}.pt" and path.is_file()
    # No temp file left behind: the session's cache holds finished cache files only (other tests add their
    # own demos' files, e.g. the shuffled-labels demo).
    names = sorted(p.name for p in demo_cache_dir.iterdir())
    assert path.name in names and all(re.fullmatch(r"demo-[0-9a-f]{16}\.pt", n) for n in names), names
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), demo_model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated zip"],
                         ids=["empty", "garbage", "truncated"])
def test_corrupt_cache_is_rebuilt(tmp_path: pathlib.Path, content: bytes, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / f"demo-{TINY.cache_key()}.pt"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="workers.demo"):
        model, returned = load_or_build_demo(tmp_path, TINY)
    assert returned == path and "unusable" in caplog.text
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    monkeypatch.setattr(demo, "train_demo_model", _must_not_train)
    reloaded, _ = load_or_build_demo(tmp_path, TINY)  # the replacement is a good cache file
    assert torch.equal(reloaded.head.weight, model.head.weight)


def test_cache_written_for_another_recipe_is_rebuilt(tmp_path: pathlib.Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / f"demo-{TINY.cache_key()}.pt"
    torch.save({"recipe_version": -1, "cache_key": TINY.cache_key(), "state_dict": {}}, path)
    with caplog.at_level(logging.WARNING, logger="workers.demo"):
        load_or_build_demo(tmp_path, TINY)
    assert "mismatch" in caplog.text
    assert torch.load(path, weights_only=True)["recipe_version"] == demo.RECIPE_VERSION


def test_unwritable_cache_still_serves_the_model(tmp_path: pathlib.Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="workers.demo"):
        model, path = load_or_build_demo(not_a_dir, TINY)
    assert isinstance(model, DemoNet) and not path.exists() and "cannot write" in caplog.text


def test_cache_key_is_stable_and_tracks_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    key = DemoConfig().cache_key()
    assert key == DemoConfig().cache_key() and len(key) == 16
    assert DemoConfig(seed=1).cache_key() != key
    monkeypatch.setattr(demo, "RECIPE_VERSION", demo.RECIPE_VERSION + 1)
    assert DemoConfig().cache_key() != key


def test_shuffled_labels_demo_has_its_own_cache_key_and_leaves_the_demo_s_alone() -> None:
    import dataclasses
    import hashlib
    import json

    key = DemoConfig().cache_key()
    assert DemoConfig(shuffle_labels=True).cache_key() not in (key, DemoConfig(seed=1, shuffle_labels=True).cache_key())
    # The ordinary demo's key is the hash of the recipe without the option: existing cache files keep their names.
    fields = {k: v for k, v in dataclasses.asdict(DemoConfig()).items() if k != "shuffle_labels"}
    blob = json.dumps({"recipe": demo.RECIPE_VERSION, **fields}, sort_keys=True)
    assert key == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "attribution-service"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / ".cache" / "attribution-service"


def test_model_space_round_trip() -> None:
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(demo.DEMO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(demo.DEMO_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(to_model_space(pixels) * std + mean, pixels)


# --- helpers ------------------------------------------------------------------------------------------------


def _must_not_train(*_args, **_kwargs):
    raise AssertionError("train_demo_model was called on a cache hit")


def _box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 4) boxes -> (N, 1, size, size) bool, True inside the box."""
    grid = torch.arange(size)
    rows = (grid >= boxes[:, 0:1]) & (grid < boxes[:, 2:3])  # (N, S)
    cols = (grid >= boxes[:, 1:2]) & (grid < boxes[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) Pearson correlations."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def _nearest_centroid_accuracy(features, train: WatermarkBatch, test: WatermarkBatch) -> float:
    """Fit class centroids of standardized `features(train)`; accuracy on `test`."""
    x_train, x_test = features(train), features(test)
    mu, sigma = x_train.mean(dim=0), x_train.std(dim=0) + 1e-6
    x_train, x_test = (x_train - mu) / sigma, (x_test - mu) / sigma
    centroids = torch.stack([x_train[train.labels == k].mean(dim=0) for k in range(int(train.labels.max()) + 1)])
    predicted = torch.cdist(x_test, centroids).argmin(dim=1)
    return (predicted == test.labels).float().mean().item()
