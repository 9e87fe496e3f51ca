from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTRY_TYPE_UNSPECIFIED: _ClassVar[EntryType]
    ENTRY_TYPE_REGULAR: _ClassVar[EntryType]
    ENTRY_TYPE_DIRECTORY: _ClassVar[EntryType]
    ENTRY_TYPE_SYMLINK: _ClassVar[EntryType]
    ENTRY_TYPE_HARDLINK: _ClassVar[EntryType]
    ENTRY_TYPE_CHAR_DEVICE: _ClassVar[EntryType]
    ENTRY_TYPE_BLOCK_DEVICE: _ClassVar[EntryType]
    ENTRY_TYPE_FIFO: _ClassVar[EntryType]
    ENTRY_TYPE_WHITEOUT: _ClassVar[EntryType]
    ENTRY_TYPE_OPAQUE: _ClassVar[EntryType]
ENTRY_TYPE_UNSPECIFIED: EntryType
ENTRY_TYPE_REGULAR: EntryType
ENTRY_TYPE_DIRECTORY: EntryType
ENTRY_TYPE_SYMLINK: EntryType
ENTRY_TYPE_HARDLINK: EntryType
ENTRY_TYPE_CHAR_DEVICE: EntryType
ENTRY_TYPE_BLOCK_DEVICE: EntryType
ENTRY_TYPE_FIFO: EntryType
ENTRY_TYPE_WHITEOUT: EntryType
ENTRY_TYPE_OPAQUE: EntryType

class Chunk(_message.Message):
    __slots__ = ("sha256", "size", "stored_size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    size: int
    stored_size: int
    def __init__(self, sha256: _Optional[bytes] = ..., size: _Optional[int] = ..., stored_size: _Optional[int] = ...) -> None: ...

class Extent(_message.Message):
    __slots__ = ("chunk", "offset", "length")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    offset: int
    length: int
    def __init__(self, chunk: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("path", "type", "mode", "uid", "gid", "uname", "gname", "size", "mtime_ns", "link_target", "xattrs", "dev_major", "dev_minor", "extents")
    class XattrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    UNAME_FIELD_NUMBER: _ClassVar[int]
    GNAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    LINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    XATTRS_FIELD_NUMBER: _ClassVar[int]
    DEV_MAJOR_FIELD_NUMBER: _ClassVar[int]
    DEV_MINOR_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    path: bytes
    type: EntryType
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int
    mtime_ns: int
    link_target: bytes
    xattrs: _containers.ScalarMap[str, bytes]
    dev_major: int
    dev_minor: int
    extents: _containers.RepeatedCompositeFieldContainer[Extent]
    def __init__(self, path: _Optional[bytes] = ..., type: _Optional[_Union[EntryType, str]] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., uname: _Optional[str] = ..., gname: _Optional[str] = ..., size: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., link_target: _Optional[bytes] = ..., xattrs: _Optional[_Mapping[str, bytes]] = ..., dev_major: _Optional[int] = ..., dev_minor: _Optional[int] = ..., extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ...) -> None: ...

class LayerIndex(_message.Message):
    __slots__ = ("format_major", "format_minor", "layer_digest", "diff_id", "media_type", "layer_size", "tar_size", "chunk_size", "converter", "chunks", "entries")
    FORMAT_MAJOR_FIELD_NUMBER: _ClassVar[int]
    FORMAT_MINOR_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_SIZE_FIELD_NUMBER: _ClassVar[int]
    TAR_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONVERTER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    format_major: int
    format_minor: int
    layer_digest: str
    diff_id: str
    media_type: str
    layer_size: int
    tar_size: int
    chunk_size: int
    converter: str
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    def __init__(self, format_major: _Optional[int] = ..., format_minor: _Optional[int] = ..., layer_digest: _Optional[str] = ..., diff_id: _Optional[str] = ..., media_type: _Optional[str] = ..., layer_size: _Optional[int] = ..., tar_size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., converter: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ...) -> None: ...
