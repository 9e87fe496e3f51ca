from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetVersionResponse(_message.Message):
    __slots__ = ("build_version", "api_versions", "capabilities")
    BUILD_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    build_version: str
    api_versions: _containers.RepeatedScalarFieldContainer[str]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, build_version: _Optional[str] = ..., api_versions: _Optional[_Iterable[str]] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class ViewSpec(_message.Message):
    __slots__ = ("view_id", "layers", "layers_below")
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_BELOW_FIELD_NUMBER: _ClassVar[int]
    view_id: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    layers_below: bool
    def __init__(self, view_id: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., layers_below: _Optional[bool] = ...) -> None: ...

class ProfileChunk(_message.Message):
    __slots__ = ("layer", "sha256", "size", "stored_size")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    layer: str
    sha256: bytes
    size: int
    stored_size: int
    def __init__(self, layer: _Optional[str] = ..., sha256: _Optional[bytes] = ..., size: _Optional[int] = ..., stored_size: _Optional[int] = ...) -> None: ...

class MountRequest(_message.Message):
    __slots__ = ("view", "profile", "image", "files")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    view: ViewSpec
    profile: _containers.RepeatedCompositeFieldContainer[ProfileChunk]
    image: str
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, view: _Optional[_Union[ViewSpec, _Mapping]] = ..., profile: _Optional[_Iterable[_Union[ProfileChunk, _Mapping]]] = ..., image: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class MountResponse(_message.Message):
    __slots__ = ("mountpoint",)
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    mountpoint: str
    def __init__(self, mountpoint: _Optional[str] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("image", "profile")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    image: str
    profile: _containers.RepeatedCompositeFieldContainer[ProfileChunk]
    def __init__(self, image: _Optional[str] = ..., profile: _Optional[_Iterable[_Union[ProfileChunk, _Mapping]]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartRecordingRequest(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: ViewSpec
    def __init__(self, view: _Optional[_Union[ViewSpec, _Mapping]] = ...) -> None: ...

class StartRecordingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopRecordingRequest(_message.Message):
    __slots__ = ("view_id",)
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    view_id: str
    def __init__(self, view_id: _Optional[str] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class FileRanges(_message.Message):
    __slots__ = ("layer", "path", "ranges")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    layer: str
    path: bytes
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    def __init__(self, layer: _Optional[str] = ..., path: _Optional[bytes] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ...) -> None: ...

class Trace(_message.Message):
    __slots__ = ("version", "recorded_at", "seconds", "chunks", "files", "ranges", "layers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    recorded_at: str
    seconds: float
    chunks: _containers.RepeatedCompositeFieldContainer[ProfileChunk]
    files: _containers.RepeatedScalarFieldContainer[str]
    ranges: _containers.RepeatedCompositeFieldContainer[FileRanges]
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., recorded_at: _Optional[str] = ..., seconds: _Optional[float] = ..., chunks: _Optional[_Iterable[_Union[ProfileChunk, _Mapping]]] = ..., files: _Optional[_Iterable[str]] = ..., ranges: _Optional[_Iterable[_Union[FileRanges, _Mapping]]] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class StopRecordingResponse(_message.Message):
    __slots__ = ("trace",)
    TRACE_FIELD_NUMBER: _ClassVar[int]
    trace: Trace
    def __init__(self, trace: _Optional[_Union[Trace, _Mapping]] = ...) -> None: ...

class UnmountRequest(_message.Message):
    __slots__ = ("view_id",)
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    view_id: str
    def __init__(self, view_id: _Optional[str] = ...) -> None: ...

class UnmountResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListViewsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListViewsResponse(_message.Message):
    __slots__ = ("views",)
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[ViewSpec]
    def __init__(self, views: _Optional[_Iterable[_Union[ViewSpec, _Mapping]]] = ...) -> None: ...

class RetainRequest(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layers: _Optional[_Iterable[str]] = ...) -> None: ...

class RetainResponse(_message.Message):
    __slots__ = ("removed_chunks",)
    REMOVED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    removed_chunks: int
    def __init__(self, removed_chunks: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ViewStatus(_message.Message):
    __slots__ = ("view", "mountpoint", "requests")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VIEW_FIELD_NUMBER: _ClassVar[int]
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    view: ViewSpec
    mountpoint: str
    requests: _containers.ScalarMap[str, int]
    def __init__(self, view: _Optional[_Union[ViewSpec, _Mapping]] = ..., mountpoint: _Optional[str] = ..., requests: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CacheStatus(_message.Message):
    __slots__ = ("bytes", "capacity", "chunks", "evictions")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    capacity: int
    chunks: int
    evictions: int
    def __init__(self, bytes: _Optional[int] = ..., capacity: _Optional[int] = ..., chunks: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class FetchStatus(_message.Message):
    __slots__ = ("chunks", "bytes", "cache_hits", "failures", "retries")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    cache_hits: int
    failures: int
    retries: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., cache_hits: _Optional[int] = ..., failures: _Optional[int] = ..., retries: _Optional[int] = ...) -> None: ...

class PrefetchStatus(_message.Message):
    __slots__ = ("profile_chunks", "profile_seconds", "fill_chunks")
    PROFILE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FILL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    profile_chunks: int
    profile_seconds: float
    fill_chunks: int
    def __init__(self, profile_chunks: _Optional[int] = ..., profile_seconds: _Optional[float] = ..., fill_chunks: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("views", "cache", "fetch", "prefetch")
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[ViewStatus]
    cache: CacheStatus
    fetch: FetchStatus
    prefetch: PrefetchStatus
    def __init__(self, views: _Optional[_Iterable[_Union[ViewStatus, _Mapping]]] = ..., cache: _Optional[_Union[CacheStatus, _Mapping]] = ..., fetch: _Optional[_Union[FetchStatus, _Mapping]] = ..., prefetch: _Optional[_Union[PrefetchStatus, _Mapping]] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HandoverRequest(_message.Message):
    __slots__ = ("fd_socket", "new_version")
    FD_SOCKET_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    fd_socket: str
    new_version: str
    def __init__(self, fd_socket: _Optional[str] = ..., new_version: _Optional[str] = ...) -> None: ...

class HandoverResponse(_message.Message):
    __slots__ = ("view_ids", "unanswered")
    VIEW_IDS_FIELD_NUMBER: _ClassVar[int]
    UNANSWERED_FIELD_NUMBER: _ClassVar[int]
    view_ids: _containers.RepeatedScalarFieldContainer[str]
    unanswered: int
    def __init__(self, view_ids: _Optional[_Iterable[str]] = ..., unanswered: _Optional[int] = ...) -> None: ...
