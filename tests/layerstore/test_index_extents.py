"""decode_index refuses an index whose extents point outside its chunks (whoever serves file data
from it would read past a chunk), unless told the caller needs only metadata."""

from __future__ import annotations

import pytest

from layerstore.errors import FormatError
from layerstore.index import FORMAT_MAJOR, decode_index, encode_index
from layerstore.pb.liftoff.index.v1 import index_pb2 as pb


def _index(chunk: int, offset: int, length: int) -> bytes:
    index = pb.LayerIndex(format_major=FORMAT_MAJOR)
    index.chunks.add(sha256=b"\1" * 32, size=100, stored_size=50)
    index.chunks.add(sha256=b"\2" * 32, size=10, stored_size=5)
    good = index.entries.add(path=b"good", type=pb.ENTRY_TYPE_REGULAR, size=110)
    good.extents.add(chunk=0, offset=0, length=100)
    good.extents.add(chunk=1, offset=0, length=10)
    bad = index.entries.add(path=b"bad", type=pb.ENTRY_TYPE_REGULAR, size=length)
    bad.extents.add(chunk=chunk, offset=offset, length=length)
    return encode_index(index)


def test_extents_inside_their_chunks_decode():
    assert decode_index(_index(1, 2, 8)).entries[1].path == b"bad"


@pytest.mark.parametrize(("chunk", "offset", "length"), [(2, 0, 1), (1, 2, 9), (0, 100, 1)])
def test_an_extent_outside_its_chunk_is_refused(chunk, offset, length):
    data = _index(chunk, offset, length)
    with pytest.raises(FormatError, match="entry b'bad' points outside its chunks"):
        decode_index(data, "the index")
    assert len(decode_index(data, check_extents=False).entries) == 2  # metadata only: not checked
