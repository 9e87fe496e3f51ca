"""One size syntax for every option: plain bytes, or K/M/G/T (binary) with optional i/B."""

from __future__ import annotations

import argparse

import pytest

from layerstore.units import MAX_SIZE, format_size, parse_size, size_arg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("128K", 128 << 10),
        ("128k", 128 << 10),
        ("128KB", 128 << 10),
        ("128KiB", 128 << 10),
        ("128Ki", 128 << 10),
        ("16MiB", 16 << 20),
        ("1.5G", 3 << 29),
        ("20 GB", 20 << 30),
        ("2T", 2 << 40),
        (" 7B ", 7),
        (".5M", 1 << 19),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "10X", "-1", "1e3", "16iB", "1.5", "M", "1..5K", "nan", "inf", "1" * 100, "99999999T"])
def test_bad_sizes_are_one_line_value_errors(text):
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert "\n" not in str(caught.value) and "size" in str(caught.value)


def test_argparse_type_reports_bounds():
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--chunk", type=size_arg(4 << 10, 64 << 20))
    assert parser.parse_args(["--chunk", "1M"]).chunk == 1 << 20
    for bad, message in (("1K", "between 4 KiB and 64 MiB"), ("10X", "is not a size")):
        with pytest.raises(argparse.ArgumentError) as caught:
            parser.parse_args(["--chunk", bad])
        assert message in str(caught.value)


@pytest.mark.parametrize("n", [0, 1, 512, 1024, 1536, 16 << 20, 3 << 29, 5 << 40, MAX_SIZE])
def test_format_reads_back(n):
    text = format_size(n)
    assert abs(parse_size(text) - n) <= n * 0.05, text
