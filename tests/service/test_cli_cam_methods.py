"""`attribution explain` with the CAM variants of one pass: `--method` and `--also`, as a person runs it."""
from __future__ import annotations

import pytest

from tests.service.test_cli_errors import attribution, images, local_config  # noqa: F401  (fixtures)

pytestmark = pytest.mark.process


def test_one_pass_writes_every_variant_asked_for(images, local_config, tmp_path):  # noqa: F811
    out = tmp_path / "cams"
    done = attribution("explain", str(images / "a"), "--local", "--config", local_config, "--method", "eigen_cam",
                       "--also", "hires_cam,xgrad_cam", "--layer", "block3", "-o", str(out))
    assert done.returncode == 0, done.stderr
    # Several maps per input: each file names its method and the class explained (the predicted one).
    names = sorted(p.name.split(".") for p in out.iterdir())
    assert [n[1] for n in names] == ["eigen_cam", "hires_cam", "xgrad_cam"]
    assert len({n[2] for n in names}) == 1 and names[0][2].startswith("t") and names[0][0] == "photo"


def test_a_misspelled_also_name_gets_a_suggestion(images, local_config):  # noqa: F811
    done = attribution("explain", str(images / "a"), "--local", "--config", local_config, "--also", "hirescam")
    assert done.returncode == 2 and "--also 'hirescam' is not known" in done.stderr and "hires_cam" in done.stderr
