"""Progress lines (layerstore.progress): totals, rate, ETA and redraw limits; and `liftoff convert`, `replicate` and
`weights load` showing one on a terminal (a pseudo-terminal as stderr), and nothing when stderr is not a terminal
or under --json."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from layerstore.progress import ProgressLine, format_duration
from layerstore.units import format_size
from liftoff.devstack.ocibuild import LayoutWriter, Member, make_tar

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
# a drawn line: done / total, percent, rate and time left
LINE = re.compile(r"\d[\d.]* (?:B|KiB|MiB|GiB) / \d[\d.]* (?:B|KiB|MiB|GiB)  \d+%  [\d.]+ (?:B|KiB|MiB|GiB)/s  ETA \d+:\d\d")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_shows_done_of_total_percent_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine(1 << 30, "convert img", stream=out, enabled=True, clock=clock)
    clock.now += 2
    line.advance(100 * MiB)
    assert out.getvalue() == "\rconvert img  100 MiB / 1 GiB  9%  50 MiB/s  ETA 0:18"
    clock.now += 0.1
    line.advance(100 * MiB)  # within 0.2 s of the last redraw: not drawn
    assert out.getvalue().count("\r") == 1
    clock.now += 0.4
    line.advance(50 * MiB)
    assert out.getvalue().endswith("\rconvert img  250 MiB / 1 GiB  24%  100 MiB/s  ETA 0:08")
    clock.now += 1.5
    line.close(1 << 30)
    assert out.getvalue().endswith("\rconvert img  1 GiB / 1 GiB  100%  256 MiB/s  in 0:04  \n")  # blanks the longer line
    line.close()  # once
    assert out.getvalue().count("\n") == 1


def test_skipped_bytes_count_as_done_but_not_toward_the_rate():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine(300 * MiB, "x", stream=out, enabled=True, clock=clock)
    clock.now += 1
    line.skip(200 * MiB)
    assert out.getvalue() == "\rx  200 MiB / 300 MiB  66%  0 B/s  ETA -:--"
    clock.now += 1
    line.advance(50 * MiB)
    assert out.getvalue().endswith("\rx  250 MiB / 300 MiB  83%  25 MiB/s  ETA 0:02")


def test_a_shorter_line_blanks_what_the_longer_one_left_and_unknown_totals_have_no_eta():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine(None, "x", stream=out, enabled=True, clock=clock)
    clock.now += 1
    line.advance(1000 * MiB)
    first = out.getvalue()
    assert first == "\rx  1000 MiB  1000 MiB/s"
    clock.now += 99
    line.set(1 << 30)
    second = out.getvalue()[len(first) :]
    assert second == "\rx  1 GiB  10.2 MiB/s" + " " * (len(first) - len("\rx  1 GiB  10.2 MiB/s"))


def test_off_a_terminal_nothing_is_written():
    out = io.StringIO()  # not a terminal
    line = ProgressLine(100, "x", stream=out)
    assert not line.enabled
    line.advance(10)
    line.follow(lambda: 50)
    line.close(100)
    assert out.getvalue() == ""


def test_follow_polls_a_counter_until_close():
    out = io.StringIO()
    line = ProgressLine(100, "x", stream=out, enabled=True)
    reached = threading.Event()

    def read() -> int:
        reached.set()
        return 40

    line.follow(read, interval=0.01)
    assert reached.wait(10)
    line.close(100)
    assert "40 B / 100 B  40%" in out.getvalue() and out.getvalue().endswith("in 0:00\n")


def test_durations():
    assert [format_duration(s) for s in (0, 7.4, 754, 3723)] == ["0:00", "0:07", "12:34", "1:02:03"]


# -- the commands, on a pseudo-terminal ------------------------------------------------------------------------------


def run_liftoff(args: list[str], terminal: bool) -> tuple[int, str, str]:
    """`python -m liftoff ARGS` with stderr on a pseudo-terminal (or a pipe); (exit, stdout, stderr)."""
    if not terminal:
        done = subprocess.run([sys.executable, "-m", "liftoff", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "liftoff", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=ROOT,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=300)
        reader.join(30)
    finally:
        os.close(master)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode()


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress")
    writer = LayoutWriter(root / "layout")
    big = os.urandom(3 * MiB)  # incompressible: the layers' compressed sizes are MiBs
    writer.tag(writer.add_image([make_tar([Member("a.bin", data=big)]), make_tar([Member("b.bin", data=big[::-1])])]), "v1")
    return root / "layout"


def _convert(layout: Path, store: Path, terminal: bool, *extra: str) -> tuple[int, str, str]:
    return run_liftoff(["convert", f"oci:{layout}:v1", "--store", f"file://{store}", *extra], terminal)


def test_convert_shows_compressed_bytes_of_the_total_on_a_terminal(layout, tmp_path):
    code, _, err = _convert(layout, tmp_path / "store", True)
    assert code == 0, err
    assert LINE.search(err), err
    total = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir() if p.stat().st_size > MiB)
    final = err.strip().splitlines()[-1].split("\r")[-1]
    assert re.search(r"(\S+ \S+) / \1  100%  .*/s  in \d+:\d\d", final), final
    assert f"/ {format_size(total)}  100%" in final, (final, total)


def test_convert_is_quiet_off_a_terminal_and_under_json(layout, tmp_path):
    code, out, err = _convert(layout, tmp_path / "store", False)
    assert code == 0 and err == "", err
    code, out, err = _convert(layout, tmp_path / "store2", True, "--json")
    assert code == 0, err
    assert "ETA" not in err and "\r" not in err.replace("\r\n", "")
    assert json.loads(out)["images"]


def test_replicate_shows_progress_on_a_terminal_only(layout, tmp_path):
    home = tmp_path / "home"
    code, _, err = _convert(layout, home, False)
    assert code == 0, err
    code, out, err = run_liftoff(["replicate", "--from", f"file://{home}", "--to", f"file://{tmp_path / 'a'}", "--all"], True)
    assert code == 0, err
    assert LINE.search(err), err
    assert re.search(r"(\S+ \S+) / \1  100%  .*/s  in \d+:\d\d", err), err
    code, out, err = run_liftoff(["replicate", "--from", f"file://{home}", "--to", f"file://{tmp_path / 'b'}", "--all"], False)
    assert code == 0 and err == "", err
    code, out, err = run_liftoff(
        ["replicate", "--from", f"file://{home}", "--to", f"file://{tmp_path / 'c'}", "--all", "--json"], True
    )
    assert code == 0 and "ETA" not in err and json.loads(out)["chunks_copied"] > 0, err


def test_weights_load_shows_progress_on_a_terminal_only(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(5)
    save_file({f"w{i}": torch.rand((256, 1024), generator=generator) for i in range(4)}, str(tmp_path / "model.safetensors"))
    code, out, err = run_liftoff(["weights", "load", str(tmp_path), "--range-size", "1MiB"], True)
    assert code == 0, err
    assert LINE.search(err), err
    assert "4 MiB / 4 MiB  100%" in err and re.search(r"in \d+:\d\d", err), err
    code, out, err = run_liftoff(["weights", "load", str(tmp_path), "--json"], False)
    assert code == 0 and err == "", err
    code, out, err = run_liftoff(["weights", "load", str(tmp_path), "--json"], True)
    assert code == 0 and "ETA" not in err and json.loads(out)["tensors"] == 4, err
