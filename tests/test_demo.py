"""The README's main command, `liftoff demo`, end to end: it must keep working on a fresh machine."""

from __future__ import annotations

import re

from tests.conftest import run_cli


def test_demo_starts_the_image_lazily_and_streams_the_model(tmp_path):
    out = run_cli("demo", "--workdir", str(tmp_path / "demo"), timeout=900).stdout
    assert "| sample app: started lazily" in out
    plain = re.search(r"containerd overlayfs\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+) registry blob GETs", out)
    lazy = re.search(
        r"liftoff \(lazy, profiled\)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+) registry blob GET \(config\), "
        r"(\d+) chunks = ([\d.]+) MB from the store",
        out,
    )
    assert plain and lazy, out
    assert int(plain.group(4)) == 4  # three layers and the config
    assert int(lazy.group(1)) == 1  # the config only: layers come from the store, lazily
    image_mb = float(re.search(r"3 layers, ([\d.]+) MB of tar", out).group(1))
    assert 0 < float(lazy.group(3)) < image_mb / 10, "the lazy start fetched most of the image"
    assert re.search(r"weightstream \(no disk\)\s+[\d.]+ s", out)
    assert not (tmp_path / "demo").exists(), "the demo left its working directory behind"
