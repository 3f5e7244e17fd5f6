"""LayerTap / LayerTaps: registered once, idle unless capturing, capture state per context.

The leak test is generated for every method that runs through a tapped model:
the hook count must not move after success or after any failure.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from workers.batching import FoldBudget
from workers.errors import InvalidArgument, LayerNotFound
from workers.kernels import hooks
from workers.kernels.cam import CAM_VARIANTS, CamRequest, explain_cam
from workers.kernels.hooks import LayerTaps, hook_count
from workers.kernels.perturbation import occlusion, score_cam


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


class Boom(nn.Module):
    """Identity until armed; then raises the configured exception (a failing layer)."""

    def __init__(self):
        super().__init__()
        self.error: BaseException | None = None

    def forward(self, x):
        if self.error is not None:
            raise self.error
        return x


class TinyNet(nn.Module):
    """(N, 3, 16, 16) -> 3 classes; `conv2` is the CAM layer, `boom` sits after it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.boom = Boom()
        self.unused = nn.Conv2d(6, 6, 1)  # a module the forward never runs
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.boom(self.conv2(self.conv1(x)))
        return self.head(x.mean(dim=(2, 3)))


def tiny_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture()
def tapped():
    model = tiny_model()
    taps = LayerTaps(model, ["conv2", "conv1", "unused"], model_name="tiny")
    yield model, taps
    taps.close()


def _inputs(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the tap itself

def test_registered_once_and_close_removes_every_hook():
    model = tiny_model()
    before = hook_count(model)
    taps = LayerTaps(model, ["conv2", "conv1", "conv2"], model_name="tiny")
    assert len(taps) == 2 and list(taps) == ["conv2", "conv1"]
    assert hook_count(model) == before + 2
    taps.close()
    assert hook_count(model) == before


def test_idle_tap_leaves_the_forward_alone(tapped):
    model, taps = tapped
    x = _inputs()
    with torch.no_grad():
        plain = model(x)
        with taps["conv2"].capture() as cap:
            pass
        again = model(x)
    assert torch.equal(plain, again)
    assert cap.activation is None  # the forward ran after the capture closed
    assert hooks._ACTIVE.get() == {}


def test_capture_sees_the_layer_output(tapped):
    model, taps = tapped
    x = _inputs()
    with torch.no_grad(), taps["conv2"].capture() as cap:
        model(x)
        expected = model.conv2(model.conv1(x))
    assert torch.equal(cap.activation, expected)
    assert not cap.activation.requires_grad


def test_require_grad_capture_truncates_the_backward_at_the_layer(tapped):
    model, taps = tapped
    x = _inputs().requires_grad_(True)
    with taps["conv2"].capture(require_grad=True) as cap:
        logits = model(x)
    act = cap.activation
    assert act.is_leaf and act.requires_grad
    grad_act, grad_x = torch.autograd.grad(logits[:, 0].sum(), [act, x], allow_unused=True)
    assert grad_x is None  # the input is not reachable: the backward stopped at the layer
    # Same gradient as a full graph with a tensor hook on the layer output.
    seen = {}
    h = model.conv2.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        logits_full = model(x)
    finally:
        h.remove()
    (expected,) = torch.autograd.grad(logits_full[:, 0].sum(), seen["out"])
    torch.testing.assert_close(grad_act, expected)


def test_nested_captures_on_two_taps_are_independent(tapped):
    model, taps = tapped
    x = _inputs()
    with torch.no_grad(), taps["conv1"].capture() as outer:
        with taps["conv2"].capture() as inner:
            model(x)
        assert set(hooks._ACTIVE.get()) == {taps["conv1"]._key}
    assert outer.activation.shape == (2, 4, 16, 16)
    assert inner.activation.shape == (2, 6, 8, 8)
    assert hooks._ACTIVE.get() == {}


def test_a_capture_in_one_thread_is_invisible_to_another(tapped):
    model, taps = tapped
    opened, other_done = threading.Event(), threading.Event()
    caps = {}

    def holder():
        with taps["conv2"].capture() as cap:
            opened.set()
            other_done.wait(10)
            caps["holder_before_own_forward"] = cap.activation
            with torch.no_grad():
                model(_inputs(seed=3))
        caps["holder"] = cap.activation

    thread = threading.Thread(target=holder)
    thread.start()
    opened.wait(10)
    with torch.no_grad():
        model(_inputs(seed=4))  # no capture in this thread: the tap stays idle
    other_done.set()
    thread.join(10)
    assert caps["holder_before_own_forward"] is None
    expected = model.conv2(model.conv1(_inputs(seed=3)))
    torch.testing.assert_close(caps["holder"], expected)


def test_captures_in_two_asyncio_tasks_on_one_thread_are_separate(tapped):
    """One thread, interleaved tasks: a thread-local would mix them up, a ContextVar does not."""
    import asyncio
    model, taps = tapped

    async def task(seed: int, other_opened: asyncio.Event, opened: asyncio.Event):
        with taps["conv2"].capture() as cap:
            opened.set()
            await other_opened.wait()  # both captures are open now
            with torch.no_grad():
                model(_inputs(seed=seed))
            await asyncio.sleep(0)
        return cap.activation

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task(10, b, a), task(11, a, b))

    got = asyncio.run(main())
    for seed, act in zip((10, 11), got):
        torch.testing.assert_close(act, model.conv2(model.conv1(_inputs(seed=seed))))


def test_unknown_layers_raise_layer_not_found(tapped):
    model, taps = tapped
    with pytest.raises(LayerNotFound) as err:
        taps["layer9"]
    assert err.value.layer == "layer9" and "conv2" in err.value.message
    with pytest.raises(LayerNotFound):
        LayerTaps(model, ["conv2", "nope"], model_name="tiny")
    assert hook_count(model) == 3  # the failed construction registered nothing


def test_a_layer_returning_a_tuple_is_a_typed_error():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)[0].mean(dim=(2, 3))

    model = Net()
    with LayerTaps(model, ["pair"]) as taps:
        with pytest.raises(InvalidArgument) as err, taps["pair"].capture():
            model(_inputs())
    assert err.value.violations[0].field == "layer"
    assert hook_count(model) == 0


# ---------------------------------------------------------------- leak test, every method

def _run(method: str, model, taps, x, t, **kw):
    if method in CAM_VARIANTS:
        return explain_cam(model, taps, [CamRequest(x, t, "conv2", (method,))], **kw)
    if method == "score_cam":
        return score_cam(model, taps, x, t, "conv2", **kw)
    return occlusion(model, x, t, patch_size=4, stride=4, **kw)


METHODS = (*CAM_VARIANTS, "score_cam", "occlusion")
FAILURES = {
    "bad_target": (None, InvalidArgument),
    "failing_layer": (RuntimeError("layer exploded"), RuntimeError),
    "out_of_memory": (torch.OutOfMemoryError("CUDA out of memory (simulated)"), torch.OutOfMemoryError),
}


@pytest.mark.parametrize("method", METHODS)
def test_no_hook_leak_after_success(tapped, method):
    model, taps = tapped
    before = hook_count(model)
    for _ in range(3):
        _run(method, model, taps, _inputs(), torch.tensor([0, 2]), budget=FoldBudget(max_rows=3))
    assert hook_count(model) == before
    assert hooks._ACTIVE.get() == {}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("method", METHODS)
def test_no_hook_leak_after_failure(tapped, method, failure):
    model, taps = tapped
    error, expected = FAILURES[failure]
    targets = torch.tensor([0, 7]) if failure == "bad_target" else torch.tensor([0, 1])
    before = hook_count(model)
    model.boom.error = error
    try:
        for _ in range(2):
            with pytest.raises(expected):
                _run(method, model, taps, _inputs(), targets, budget=FoldBudget(max_rows=3))
    finally:
        model.boom.error = None
    assert hook_count(model) == before
    assert hooks._ACTIVE.get() == {}
    # The tap still works (no half-open capture was left behind).
    _run(method, model, taps, _inputs(), torch.tensor([0, 1]), budget=FoldBudget(max_rows=3))
    assert hook_count(model) == before
