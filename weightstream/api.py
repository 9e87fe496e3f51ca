"""The public API: open a checkpoint, iterate (name, tensor), load into a dict or into a module."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from weightstream.checkpoint import CheckpointFile, check_index, discover, load_manifest, read_header
from weightstream.engine import Engine, StreamStats
from weightstream.errors import CheckpointFormatError, LoadMismatchError, WeightsError
from weightstream.format import TensorInfo
from weightstream.hostsink import HostSink
from weightstream.options import StreamOptions
from weightstream.plan import Item, Piece, TensorSlice, item_pieces, plan_ranges
from weightstream.pool import ByteBudget
from weightstream.sources import Location, open_location

log = logging.getLogger(__name__)

NameFilter = Callable[[str], bool] | str | Iterable[str] | None
SliceSpec = Callable[[str, tuple[int, ...]], TensorSlice | None] | Mapping[str, TensorSlice] | None


def name_filter(spec: NameFilter) -> Callable[[str], bool]:
    """A predicate from a callable, a glob pattern ("model.layers.0.*") or a collection of exact names."""
    if spec is None:
        return lambda name: True
    if callable(spec):
        return spec
    if isinstance(spec, str):
        return lambda name: fnmatch.fnmatchcase(name, spec)
    names = frozenset(spec)
    return names.__contains__


def parse_device(device: str | torch.device) -> torch.device:
    """cpu, cuda, cuda:N (cuda alone means the current CUDA device)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise WeightsError(f"unknown device {device!r}: use cpu or cuda:N ({e})") from None
    if parsed.type not in ("cpu", "cuda"):
        raise WeightsError(f"device {device!r} is not supported: use cpu or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightsError(f"device {device!r} requested but CUDA is not available here: use device='cpu'")
        if parsed.index is None:
            parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed


class TensorStream:
    """One pass over (name, tensor) pairs, in file order; `stats` is filled in as it runs.

    Nothing is allocated or fetched until iteration starts (the CUDA ring included).
    """

    def __init__(self, make_engine: Callable[[StreamStats], Engine]) -> None:
        self._make_engine = make_engine
        self.stats = StreamStats()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for item, tensor in self._make_engine(self.stats):
            yield item.name, tensor


@dataclass
class LoadResult:
    """What load_into() did not match: names missing from the checkpoint, and checkpoint names the module lacks."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stats: StreamStats | None = None


class Checkpoint:
    """A safetensors checkpoint (one file or shards) whose headers have been read and validated."""

    def __init__(
        self,
        location: Location,
        files: list[CheckpointFile],
        options: StreamOptions,
        manifest: dict[str, str] | None = None,
        index: str | None = None,
    ) -> None:
        self.location = location
        self.url = location.url if not location.explicit or location.explicit == index else location.url + location.explicit
        self.files = files
        self.options = options
        self.manifest = manifest
        self._pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="weightstream")
        self.last_stats: StreamStats | None = None  # of the last load()

    # -- what is in it --------------------------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, in file order."""
        return {t.name: t for f in self.files for t in f.header.tensors}

    @property
    def metadata(self) -> dict[str, str]:
        """The files' __metadata__, merged."""
        merged: dict[str, str] = {}
        for f in self.files:
            merged.update(f.header.metadata)
        return merged

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.header.tensors)

    # -- reading --------------------------------------------------------------------------------------
    def _items(
        self,
        keep: Callable[[str], bool],
        slices: SliceSpec,
        destinations: Mapping[str, torch.Tensor] | None,
        options: StreamOptions | None = None,
    ) -> tuple[list[Item], list]:
        options = options or self.options
        if isinstance(slices, Mapping):
            table = slices
            slices = lambda name, shape: table.get(name)  # noqa: E731
        items: list[Item] = []
        ranges: list = []
        for index, f in enumerate(self.files):
            pieces: list[Piece] = []
            for info in f.header.tensors:
                if not keep(info.name):
                    continue
                piece_slice = slices(info.name, info.shape) if slices else None
                if piece_slice is not None:
                    piece_slice.check(info.name, info.shape)
                dest = destinations.get(info.name) if destinations else None
                item = Item(len(items), info.name, index, info, piece_slice, dest=dest)
                items.append(item)
                pieces += item_pieces(item, options.min_piece)
            ranges += plan_ranges(index, f.ref, pieces, options)
        return items, ranges

    def stream(
        self,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        filter: NameFilter = None,
        slices: SliceSpec = None,
        destinations: Mapping[str, torch.Tensor] | None = None,
        verify: bool | None = None,
        hold_all: bool = False,
        coalesce_gap: int | None = None,
    ) -> TensorStream:
        """Stream (name, tensor) pairs in file order; memory held ahead of the consumer stays within pool_bytes.

        Tensors are complete when handed out and stay valid (each owns its memory). dtype converts
        floating-point tensors. With a sha256 manifest (verify defaults to True then), a file's tensors
        are handed out only after the whole file has been checked. `slices` reads part of a tensor
        (see weightstream.tp); `destinations` names preallocated tensors to fill in place; `coalesce_gap`
        overrides the option for this stream (0: never read bytes that were not asked for).
        """
        target = parse_device(device)
        keep = name_filter(filter)
        verify = bool(self.manifest) if verify is None else verify
        options = self.options if coalesce_gap is None else self.options.with_(coalesce_gap=coalesce_gap)
        items, ranges = self._items(keep, slices, destinations, options)
        digests = None
        if verify:
            if not self.manifest:
                raise ValueError("verify=True needs a sha256 manifest: pass sha256= to weightstream.open()")
            if filter is not None or slices:
                raise ValueError("sha256 verification reads whole files: drop the filter/slices or pass verify=False")
            digests = {}
            for index, f in enumerate(self.files):
                if f.name not in self.manifest:
                    raise CheckpointFormatError(f"the sha256 manifest has no entry for {f.ref.name}: add it or pass verify=False")
                digests[index] = (self.manifest[f.name], f.ref.name)

        def make_engine(stats: StreamStats) -> Engine:
            if target.type == "cuda":
                from weightstream.cuda import CudaSink

                slots = max(1, self.options.pool_bytes // self.options.range_size)
                sink = CudaSink(target, slots, self.options.range_size, items if hold_all else None)
            else:
                sink = HostSink(ByteBudget(None if (hold_all or verify) else self.options.pool_bytes))
            headers = [f.header for f in self.files]
            return Engine(
                items, ranges, sink, self.location.reader, self._pool, self.options.concurrency, headers, digests, dtype, stats
            )

        return TensorStream(make_engine)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.stream())

    def load(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        filter: NameFilter = None,
        slices: SliceSpec = None,
    ) -> dict[str, torch.Tensor]:
        """Every (selected) tensor in a dict; on any error nothing is returned."""
        stream = self.stream(device=device, dtype=dtype, filter=filter, slices=slices, hold_all=True)
        result = dict(stream)
        self.last_stats = stream.stats
        log.info(
            "%s: %d tensors, %.2f GB in %.2fs (%.2f GB/s, %d retries)",
            self.url,
            stream.stats.tensors,
            stream.stats.bytes_fetched / 1e9,
            stream.stats.seconds,
            stream.stats.gbps,
            stream.stats.retries,
        )
        return result

    def close(self) -> None:
        """Stop the worker threads and close connections."""
        self._pool.shutdown(wait=True)
        self.location.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(
    url: str | os.PathLike[str],
    *,
    sha256: Mapping[str, str] | str | None = None,
    options: StreamOptions | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    path_style: bool | None = None,
    **tunables: object,
) -> Checkpoint:
    """Open s3://bucket/prefix/ (model.safetensors or a sharded index), file:///path or a path; headers are read now.

    `sha256`: a manifest (name -> hex, or the name/path of a JSON or sha256sum file) to verify files against.
    Keyword tunables (range_size, concurrency, pool_bytes, stall_timeout, max_retries, ...) override `options`.
    """
    opts = (options or StreamOptions()).with_(**tunables)
    location = open_location(os.fspath(url), opts, endpoint_url=endpoint_url, region=region, path_style=path_style)
    try:
        names, weight_map, index = discover(location)
        with ThreadPoolExecutor(min(len(names), opts.concurrency)) as pool:
            files = list(pool.map(lambda name: read_header(location, name), names))
        check_index(files, weight_map, location.url + (index or ""))
        manifest = load_manifest(sha256, location) if sha256 is not None else None
        return Checkpoint(location, files, opts, manifest, index)
    except BaseException:
        location.close()
        raise


def load(
    url: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    filter: NameFilter = None,
    **open_kwargs: object,
) -> dict[str, torch.Tensor]:
    """weightstream.open(url).load(...): every tensor as a dict on `device`."""
    with open(url, **open_kwargs) as checkpoint:  # type: ignore[arg-type]
        return checkpoint.load(device, dtype, filter=filter)


def _some(names: list[str], count: int = 8) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Names that share storage with each other (tied weights): data_ptr -> names."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel():
            groups.setdefault((tensor.device, tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    return {n: names for names in groups.values() if len(names) > 1 for n in names}


def load_into(
    module: torch.nn.Module,
    url: str | os.PathLike[str] | Checkpoint,
    strict: bool = True,
    *,
    filter: NameFilter = None,
    group: object = None,
    **open_kwargs: object,
) -> LoadResult:
    """Fill `module`'s parameters and buffers from the checkpoint, in place (bytes land in the parameters' memory
    where dtype and layout match, else are copied in). strict: every state_dict entry must be in the checkpoint
    and vice versa, checked from the headers before any data is fetched. On an error the module is left partly
    loaded: load again, or discard it.

    group: a torch.distributed process group whose ranks all call load_into with the same checkpoint and an
    equal module (e.g. the tensor-parallel ranks of a node): each rank fetches about 1/N of the tensors the
    module needs and the ranks exchange them (weightstream.readonce), so the group reads them once in total.
    """
    checkpoint = url if isinstance(url, Checkpoint) else open(url, **open_kwargs)  # type: ignore[arg-type]
    try:
        keep = name_filter(filter)
        state = {k: v for k, v in module.state_dict(keep_vars=True).items() if keep(k)}
        available = {k: v for k, v in checkpoint.tensors.items() if keep(k)}
        tied = _tied_aliases(state)
        missing = [k for k in state if k not in available and not any(a in available for a in tied.get(k, []))]
        unexpected = [k for k in available if k not in state]
        if strict and (missing or unexpected):
            raise LoadMismatchError(
                f"{checkpoint.url} does not match {type(module).__name__}: "
                + "; ".join(
                    f"{kind} {len(names)} ({_some(names)})"
                    for kind, names in (("missing", missing), ("unexpected", unexpected))
                    if names
                )
                + "; pass strict=False to load the common part"
            )
        wanted = [k for k in available if k in state]
        destinations: dict[str, torch.Tensor] = {}
        devices = set()
        for name in wanted:
            target, info = state[name], available[name]
            if target.is_meta:
                raise LoadMismatchError(
                    f"{name} is on the meta device: materialize the module first (module.to_empty(device=...))"
                )
            if tuple(target.shape) != info.shape:
                raise LoadMismatchError(
                    f"{checkpoint.url}: tensor {name!r} has shape {list(info.shape)}, the module expects {list(target.shape)}"
                )
            devices.add(target.device)
            if target.dtype == info.torch_dtype and target.is_contiguous() and target.device.type in ("cpu", "cuda"):
                destinations[name] = target.detach()
        cuda = [d for d in devices if d.type == "cuda"]
        device = cuda[0] if len(cuda) == 1 and len(devices) == 1 else torch.device("cpu")
        if device.type == "cpu":
            destinations = {k: v for k, v in destinations.items() if v.device.type == "cpu"}
        if group is not None:
            from weightstream.readonce import SharedStream

            shared = SharedStream(checkpoint, group, device=device, filter=set(wanted))  # type: ignore[arg-type]
            with torch.no_grad():
                for name, tensor in shared:
                    state[name].copy_(tensor)
            return LoadResult(missing, unexpected, shared.stats)
        subset = None if len(wanted) == len(checkpoint.tensors) else set(wanted)  # whole files can be sha256-verified
        stream = checkpoint.stream(device=device, filter=subset, destinations=destinations)
        with torch.no_grad():
            for name, tensor in stream:
                if name not in destinations:
                    state[name].copy_(tensor)
        return LoadResult(missing, unexpected, stream.stats)
    finally:
        if not isinstance(url, Checkpoint):
            checkpoint.close()
