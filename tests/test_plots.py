"""benchmarks/plots.py draws each benchmark's picture from results in the shape the benchmark produces (small
synthetic ones here: the benchmarks themselves take minutes to hours)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from benchmarks.coldstart import Sample
from benchmarks.plots import coldstart_plot, compaction_plot, weights_plot
from benchmarks.weights import LABELS


def assert_png(path: Path, min_width: int = 400) -> None:
    """A whole PNG (signature, header, end chunk) of a real picture, and nothing left half-written beside it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= 100, (width, height)
    assert len(data) > 10_000, len(data)  # axes, bars and text, not an empty canvas
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_coldstart_timeline(tmp_path):
    def sample(pull: float, run: float, registry: int, store: int) -> dict:
        return Sample(pull, run, run / 3, registry, store, 0.4, {"READ": 100}).__dict__

    report = {
        "runs": 2,
        "results": {
            f"{setting}/torch": {
                "a": [sample(30.0, 2.0, 350_000_000, 0), sample(32.0, 2.2, 350_000_000, 0)],
                "b": [sample(0.5, 9.0, 1_000, 120_000_000), sample(0.6, 9.5, 1_000, 125_000_000)],
                "c": [sample(0.5, 4.0, 1_000, 90_000_000), sample(0.5, 4.2, 1_000, 90_000_000)],
            }
            for setting in ("unshaped", "shaped")
        },
    }
    path = coldstart_plot(report, tmp_path / "out" / "coldstart.png")
    assert path == tmp_path / "out" / "coldstart.png"
    assert_png(path)
    with pytest.raises(ValueError, match="no results"):
        coldstart_plot({"results": {}}, tmp_path / "empty.png")


def test_weights_rates(tmp_path):
    rows = [
        {"setting": setting, "layout": layout, "contender": LABELS[method], "gbps": gbps}
        for setting in ("unshaped", "20 ms + 100 MB/s per connection")
        for layout in ("single", "sharded")
        for method, gbps in (("boto3", 0.3), ("liftoff", 2.1), ("raw", 2.4))
    ]
    assert_png(weights_plot(rows, tmp_path / "weights.png"))


def test_compaction_cost_and_nodes_over_the_trace(tmp_path):
    hours = [i / 12 for i in range(12 * 24)]
    runs = {
        name: {
            "series": {
                "t_h": hours,
                "cost_per_hour": [scale * (10 + (h % 6)) for h in hours],
                "nodes": [scale * (4 + (h % 6) // 2) for h in hours],
            }
        }
        for name, scale in (("none", 1.0), ("ray", 0.8), ("liftoff", 0.6))
    }
    res = {"scenario": "synthetic", "per_seed": [{"seed": 1, "runs": runs}]}
    assert_png(compaction_plot(res, tmp_path / "compaction.png"))
