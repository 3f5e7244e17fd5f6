"""Output names of `attribution explain`: one distinct file per input, however the inputs are named."""
from service.cli import suggest
from service.cli.explain import output_stems


def test_repeated_stems_take_the_nearest_folders_that_tell_them_apart():
    assert output_stems(["/x/images/a/photo.png", "/x/images/b/photo.png", "dog.jpg"]) == [
        "photo-a", "photo-b", "dog"]
    assert output_stems(["/p/q/r.png", "/s/q/r.png"]) == ["r-q-p", "r-q-s"]


def test_the_same_path_twice_is_numbered():
    assert output_stems(["c.png", "c.png", "d.png"]) == ["c-1", "c-2", "d"]


def test_suggestions_are_offered_only_when_close():
    assert suggest("gradcam", ["grad_cam", "layer_cam"]) == "; did you mean 'grad_cam'?"
    assert suggest("Grad-CAM", ["grad_cam", "layer_cam"]) == "; did you mean 'grad_cam'?"
    assert suggest("xyz", ["grad_cam", "layer_cam"]) == ""
