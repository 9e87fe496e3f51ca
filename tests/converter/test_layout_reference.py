"""An image converted from an OCI layout is found again by the name it was converted from:
`liftoff convert oci:DIR:TAG` records the layout's reference, and inspect resolves `oci:` names
the way convert does (the layout's manifest), from any working directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar


def liftoff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liftoff", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_inspect_and_ls_find_an_image_converted_from_a_layout(tmp_path):
    work = tmp_path / "work"
    writer = LayoutWriter(work / "layout")
    writer.tag(writer.add_image([make_tar([Member("hello.txt", data=b"hello\n")])]), "v1")
    writer.tag(writer.add_image([make_tar([Member("other.txt", data=b"other\n")])]), "v2")
    store = f"file://{tmp_path / 'store'}"
    reference = f"oci:{work / 'layout'}:v1"

    done = liftoff("convert", "oci:layout:v1", "--store", store, "--json", cwd=work)  # a relative layout path
    assert done.returncode == 0, done.stderr
    digest = json.loads(done.stdout)["manifest_digest"]

    listing = json.loads(liftoff("ls", "--store", store, "--json", cwd=tmp_path).stdout)
    assert [row["references"] for row in listing] == [[reference]]
    text = liftoff("ls", "--store", store, cwd=tmp_path).stdout
    assert reference in text

    for name, cwd in (("oci:layout:v1", work), (reference, tmp_path)):
        done = liftoff("inspect", name, "--store", store, "--json", cwd=cwd)
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["digest"] == digest and info["references"] == [reference]

    # a tag of the layout that was never converted: one line saying so, naming what to run
    done = liftoff("inspect", "oci:layout:v2", "--store", store, cwd=work)
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "liftoff convert oci:layout:v2" in lines[0], done.stderr

    # the layout is gone: the recorded reference still finds the image
    (work / "layout").rename(tmp_path / "moved")
    done = liftoff("inspect", reference, "--store", store, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["digest"] == digest
