"""Read once per node: the ranks of a process group each stream a disjoint share of the checkpoint and broadcast
it to the others, so every rank gets every selected tensor whole (what vLLM's weight loaders expect: they narrow
full tensors themselves) while the group fetches the checkpoint's bytes once in total, whatever its size.

The plan is a pure function of the headers, the selection and the group size, so every rank computes the same one:

- tensors, in file order, are cut into windows of about `window_bytes` (a bigger tensor is a window by itself);
- a tensor of at least `split_bytes` with 2+ rows is split by rows (dim 0: contiguous bytes) among all ranks,
  so every rank fetches about 1/N of every big tensor; smaller tensors go whole, in runs of consecutive tensors
  (few requests), each run to the rank with the fewest bytes so far: shares balance per window and overall;
- per window each rank streams its pieces (one ranged-GET stream over the whole checkpoint, memory ahead of the
  consumer bounded by pool_bytes), then broadcasts them to the group: one flat buffer per rank per window (its
  pieces packed, or its single piece sent in place), in chunks of at most `window_bytes`. The next window is
  fetched while the current one's broadcasts run; at most two windows are held.

Before each window's broadcasts the ranks all-reduce a small status vector: a rank that failed (a fetch error, a
consumer that stopped early) says so and the others raise a WeightsError naming it at once, rather than waiting
in a collective; it also carries a fingerprint of the plan, so ranks that disagree about what to read fail
instead of exchanging the wrong bytes. A rank that dies outright is noticed by the process group (its timeout
bounds the wait) and reported the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from weightstream.api import Checkpoint, NameFilter, TensorStream, name_filter, open, parse_device
from weightstream.engine import StreamStats
from weightstream.errors import WeightsError
from weightstream.format import TensorInfo
from weightstream.hostsink import allocate_host
from weightstream.plan import TensorSlice
from weightstream.tp import split_bounds

MiB = 1 << 20
DEFAULT_WINDOW_BYTES = 128 * MiB
DEFAULT_SPLIT_BYTES = 16 * MiB
RUN_BYTES = 1 * MiB  # consecutive small tensors go to one rank until their run reaches this (one GET, not many)
ALIGN = 256  # offsets of pieces in a packed buffer (views need dtype alignment; 256 keeps device kernels happy)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Share:
    """Bytes [start, stop) of tensor `tensor` (an index into the window), fetched by rank `owner`."""

    tensor: int
    owner: int
    start: int
    stop: int
    rows: tuple[int, int] | None = None  # the dim-0 rows, when the tensor is split

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass
class Window:
    """Consecutive tensors and who fetches which bytes of them; `layout[rank]`: (share, offset in rank's pack)."""

    tensors: list[TensorInfo]
    shares: list[Share] = field(default_factory=list)
    layout: list[list[tuple[Share, int]]] = field(default_factory=list)
    pack_bytes: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_windows(
    tensors: Sequence[TensorInfo], world: int, window_bytes: int = DEFAULT_WINDOW_BYTES, split_bytes: int = DEFAULT_SPLIT_BYTES
) -> list[Window]:
    """Cut `tensors` (file order) into windows and assign every byte to exactly one of `world` ranks."""
    if world < 1:
        raise ValueError("a group has at least one rank")
    if window_bytes < 1 or split_bytes < 1:
        raise ValueError("window_bytes and split_bytes must be positive")
    windows: list[Window] = []
    current: list[TensorInfo] = []
    size = 0
    for info in tensors:
        if current and size + info.nbytes > window_bytes:
            windows.append(Window(current))
            current, size = [], 0
        current.append(info)
        size += info.nbytes
    if current:
        windows.append(Window(current))
    load = [0] * world
    run_owner, run_bytes = -1, RUN_BYTES
    splits = 0
    for window in windows:
        for index, info in enumerate(window.tensors):
            if info.nbytes == 0:
                continue
            if info.nbytes >= split_bytes and len(info.shape) >= 1 and info.shape[0] >= 2 and world > 1:
                row = info.nbytes // info.shape[0]
                for part in range(world):
                    a, b = split_bounds(info.shape[0], part, world)
                    if a == b:
                        continue
                    owner = (part + splits) % world  # rotate who gets the extra rows
                    window.shares.append(Share(index, owner, a * row, b * row, (a, b)))
                    load[owner] += (b - a) * row
                splits += 1
                run_bytes = RUN_BYTES
                continue
            if run_bytes >= RUN_BYTES:
                run_owner = min(range(world), key=lambda r: (load[r], r))
                run_bytes = 0
            window.shares.append(Share(index, run_owner, 0, info.nbytes))
            load[run_owner] += info.nbytes
            run_bytes += info.nbytes
        window.layout = [[] for _ in range(world)]
        window.pack_bytes = [0] * world
        for share in window.shares:
            offset = window.pack_bytes[share.owner]
            window.layout[share.owner].append((share, offset))
            window.pack_bytes[share.owner] = _align(offset + share.nbytes)
    return windows


def fingerprint(tensors: Sequence[TensorInfo], world: int, window_bytes: int, split_bytes: int) -> int:
    """A 62-bit digest of the plan's inputs: every rank of the group must compute the same."""
    digest = hashlib.sha256(f"{world}:{window_bytes}:{split_bytes}".encode())
    for t in tensors:
        digest.update(f"\n{t.name}:{t.dtype}:{list(t.shape)}:{t.nbytes}".encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 2


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8, device=tensor.device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class _PeerFailed(WeightsError):
    """Another rank reported a failure: this rank stops without a collective of its own."""


class SharedStream:
    """Every selected tensor, whole, in file order, on every rank of `group`; each rank fetches about 1/N.

    All ranks of the group must iterate it with the same checkpoint and selection (checked), and each must
    iterate to the end or stop (the others are told). `stats.bytes_fetched` is this rank's share;
    `stats.bytes_received` what arrived from the other ranks.
    """

    def __init__(
        self,
        source: Checkpoint | str | os.PathLike[str],
        group: dist.ProcessGroup,
        *,
        device: str | torch.device = "cpu",
        filter: NameFilter = None,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        split_bytes: int = DEFAULT_SPLIT_BYTES,
        **open_kwargs: object,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise WeightsError("a shared (read-once) stream needs torch.distributed initialised with a process group")
        self.source = source
        self.group = group
        self.device = parse_device(device)
        backend = str(dist.get_backend(group)).lower()
        if backend == "nccl" and self.device.type != "cuda":
            raise WeightsError(f"process group backend nccl exchanges CUDA tensors: load to a cuda device, not {self.device}")
        if backend == "gloo" and self.device.type != "cpu":
            raise WeightsError(
                f"process group backend gloo exchanges CPU tensors here: pass device='cpu' or an nccl group, not {self.device}"
            )
        self.keep = name_filter(filter)
        self.window_bytes = window_bytes
        self.split_bytes = split_bytes
        self.open_kwargs = open_kwargs
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.url = source.url if isinstance(source, Checkpoint) else os.fspath(source)
        self.stats = StreamStats()

    # -- collectives -------------------------------------------------------------------------------------------
    def _status(self, failed: bool, print_: int) -> None:
        """All-reduce (MAX) [failed flag per rank..., fingerprint, -fingerprint]; raise if any rank failed or differs."""
        vector = torch.zeros(self.world + 2, dtype=torch.int64, device=self.device)
        vector[self.rank] = int(failed)
        vector[self.world] = print_
        vector[self.world + 1] = -print_
        self._collective(lambda: dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self.group), "status")
        values = vector.tolist()
        bad = [r for r in range(self.world) if values[r] and r != self.rank]
        if bad:
            raise _PeerFailed(
                f"read-once load of {self.url}: rank(s) {bad} of the group failed or stopped while reading their share: "
                "see their logs for the cause"
            )
        if not failed and values[self.world] != -values[self.world + 1]:
            raise _PeerFailed(
                f"read-once load of {self.url}: the ranks of the group disagree about what to read (different checkpoints, "
                "filters or models): every rank must load the same checkpoint with the same selection"
            )

    def _collective(self, call: Callable[[], object], what: str) -> object:
        try:
            return call()
        except (RuntimeError, dist.DistBackendError) as e:  # a peer died, or the group's timeout passed
            self._broken = True
            raise WeightsError(
                f"read-once load of {self.url}: the {what} exchange with the group failed ({_first_line(e)}): "
                "a peer rank died or stalled; see the other ranks' logs"
            ) from e

    def _wait(self, works: list) -> None:
        for work in works:
            self._collective(work.wait, "tensor")

    # -- one window --------------------------------------------------------------------------------------------
    def _fetch(self, window: Window, mine: Iterator[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """This rank's pieces of `window`, from its own stream (same order as the plan)."""
        pieces = []
        for share, _ in window.layout[self.rank]:
            info = window.tensors[share.tensor]
            name, tensor = next(mine)
            if name != info.name or tensor.numel() * tensor.element_size() != share.nbytes:
                raise RuntimeError(f"internal: expected {info.name} ({share.nbytes} bytes), the stream gave {name}")
            pieces.append(tensor)
        return pieces

    def _allocate(self, window: Window) -> tuple[list[torch.Tensor | None], dict[int, torch.Tensor]]:
        """The window's receive memory: every tensor this rank does not fetch whole, and each multi-piece pack.
        Runs in a helper thread while this rank's pieces download (populating pages costs CPU time)."""
        whole_mine = {share.tensor for share, _ in window.layout[self.rank] if share.rows is None}
        outputs: list[torch.Tensor | None] = [
            None if index in whole_mine else self._empty(info.nbytes).view(info.torch_dtype).reshape(info.shape)
            for index, info in enumerate(window.tensors)
        ]
        packs = {src: self._empty(window.pack_bytes[src]) for src in range(self.world) if len(window.layout[src]) > 1}
        return outputs, packs

    def _issue(
        self, window: Window, pieces: list[torch.Tensor], allocated: tuple[list[torch.Tensor | None], dict[int, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list, list]:
        """Start the window's broadcasts; returns (tensors, packs to unpack, works)."""
        outputs, buffers = allocated
        for (share, _), piece in zip(window.layout[self.rank], pieces, strict=True):
            if share.rows is None:
                outputs[share.tensor] = piece  # a whole tensor this rank fetched: it owns its memory already
        tensors: list[torch.Tensor] = outputs  # type: ignore[assignment]
        flats = [_byte_view(t) for t in tensors]
        mine = {id(share): piece for (share, _), piece in zip(window.layout[self.rank], pieces, strict=True)}
        packs: list[tuple[list[tuple[Share, int]], torch.Tensor]] = []
        works: list = []
        for src in range(self.world):
            layout = window.layout[src]
            if not layout:
                continue
            if len(layout) == 1:  # one piece: send it in place, receive it in place (rows are contiguous bytes)
                share = layout[0][0]
                buffer = flats[share.tensor][share.start : share.stop]
                if src == self.rank and share.rows is not None:
                    buffer.copy_(_byte_view(mine[id(share)]))
            else:
                buffer = buffers[src]
                if src == self.rank:
                    for share, offset in layout:
                        piece = _byte_view(mine[id(share)])
                        buffer[offset : offset + share.nbytes].copy_(piece)
                        if share.rows is not None:
                            flats[share.tensor][share.start : share.stop].copy_(piece)
                else:
                    packs.append((layout, buffer))
                    self.stats.bytes_received += sum(s.nbytes for s, _ in layout)
            if len(layout) == 1 and src != self.rank:
                self.stats.bytes_received += layout[0][0].nbytes
            for start in range(0, buffer.numel(), self.window_bytes):
                chunk = buffer[start : start + self.window_bytes]
                works.append(
                    self._collective(
                        lambda chunk=chunk, src=src: dist.broadcast(chunk, group=self.group, group_src=src, async_op=True),
                        "tensor",
                    )
                )
        return tensors, packs, works

    def _empty(self, nbytes: int) -> torch.Tensor:
        """Bytes to receive into: on CPU prefaulted (MAP_POPULATE), which gloo fills ~3x faster than fresh pages."""
        if self.device.type == "cpu":
            return allocate_host(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @staticmethod
    def _unpack(tensors: list[torch.Tensor], packs: list) -> None:
        for layout, buffer in packs:
            for share, offset in layout:
                _byte_view(tensors[share.tensor])[share.start : share.stop].copy_(buffer[offset : offset + share.nbytes])

    # -- the stream --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        started = time.perf_counter()
        self._broken = False
        aligned = True  # this rank's next collective is a status (so it may report a failure there)
        windows: list[Window] = []
        next_window = 0  # windows whose status has been exchanged
        owned_checkpoint = not isinstance(self.source, Checkpoint)
        checkpoint: Checkpoint | None = None
        mine: Iterator[tuple[str, torch.Tensor]] | None = None
        own_stream = None
        helper = ThreadPoolExecutor(1, thread_name_prefix="weightstream-alloc")
        try:
            try:
                checkpoint = self.source if isinstance(self.source, Checkpoint) else open(self.source, **self.open_kwargs)  # type: ignore[arg-type]
                self.url = checkpoint.url
                if checkpoint.manifest:
                    raise WeightsError(
                        f"{self.url}: a sha256 manifest is checked on whole files and a read-once load reads shares of "
                        "them: load without the manifest, or without the process group"
                    )
                selected = [t for f in checkpoint.files for t in f.header.tensors if self.keep(t.name)]
                windows = plan_windows(selected, self.world, self.window_bytes, self.split_bytes)
                print_ = fingerprint(selected, self.world, self.window_bytes, self.split_bytes)
                names = {w.tensors[s.tensor].name for w in windows for s, _ in w.layout[self.rank]}
                slices = {
                    w.tensors[s.tensor].name: TensorSlice(0, *s.rows)
                    for w in windows
                    for s, _ in w.layout[self.rank]
                    if s.rows is not None
                }
                own_stream = checkpoint.stream(device=self.device, filter=names, slices=slices, coalesce_gap=0)
                mine = iter(own_stream)
                allocating = helper.submit(self._allocate, windows[0]) if windows else None
                pieces = self._fetch(windows[0], mine) if windows else []
                allocated = allocating.result() if allocating else None
            except _PeerFailed:
                raise
            except Exception:
                if not self._broken:
                    aligned = False
                    self._status(True, 0)
                raise
            aligned = False
            self._status(False, print_)
            pending = self._issue(windows[0], pieces, allocated) if allocated else None
            aligned = True
            next_window = 1
            for index in range(len(windows)):
                upcoming = None
                if index + 1 < len(windows):
                    try:
                        allocating = helper.submit(self._allocate, windows[index + 1])
                        pieces = self._fetch(windows[index + 1], mine)
                        allocated = allocating.result()
                    except Exception:
                        aligned = False
                        self._status(True, 0)
                        raise
                    aligned = False
                    self._status(False, print_)
                    upcoming = self._issue(windows[index + 1], pieces, allocated)
                    aligned = True
                    next_window = index + 2
                assert pending is not None
                tensors, packs, works = pending
                self._wait(works)
                self._unpack(tensors, packs)
                pending = upcoming
                for info, tensor in zip(windows[index].tensors, tensors, strict=True):
                    self.stats.tensors += 1
                    self.stats.bytes_delivered += info.nbytes
                    yield info.name, tensor
                del tensors, packs, works
        except BaseException:
            # stopped between windows (the consumer gave up, or raised): tell the others at their next status
            if aligned and not self._broken and next_window < len(windows):
                try:
                    self._status(True, 0)
                except WeightsError:
                    pass
            raise
        finally:
            helper.shutdown(wait=True)
            if mine is not None:
                close = getattr(mine, "close", None)
                if close is not None:
                    close()
            if own_stream is not None:
                for name in ("bytes_fetched", "ranges", "retries", "peak_held"):
                    setattr(self.stats, name, getattr(own_stream.stats, name))
            self.stats.seconds = time.perf_counter() - started
            if owned_checkpoint and checkpoint is not None:
                checkpoint.close()


def shared_stream(
    source: Checkpoint | str | os.PathLike[str],
    group: dist.ProcessGroup,
    *,
    device: str | torch.device = "cpu",
    filter: NameFilter = None,
    **kwargs: object,
) -> SharedStream:
    """SharedStream(...): the checkpoint read once by the group, every tensor whole on every rank."""
    return SharedStream(source, group, device=device, filter=filter, **kwargs)  # type: ignore[arg-type]


def stage_filter(model: torch.nn.Module) -> Callable[[str], bool]:
    """For a pipeline stage's model: False for checkpoint names under a module with no parameters and no buffers
    (the placeholders vLLM's pipeline-parallel models put where another stage's layers are), True otherwise
    (names the model does not know, e.g. stacked q/k/v, are kept: the model's load_weights decides)."""
    modules = dict(model.named_modules())
    empty = {
        name
        for name, module in modules.items()
        if name and next(module.parameters(), None) is None and next(module.buffers(), None) is None
    }

    def keep(name: str) -> bool:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                return prefix not in empty
        return True

    return keep


def model_stream(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    *,
    device: str | torch.device,
    group: dist.ProcessGroup | None = None,
    pipeline_parallel: bool = False,
    **kwargs: object,
) -> SharedStream | TensorStream:
    """The (name, full tensor) stream a tensor-parallel worker feeds to model.load_weights (vLLM's loader uses it).

    group: the worker's tensor-parallel group (a torch ProcessGroup; None or one rank: no exchange): the group
    reads the checkpoint once and every rank still gets whole tensors in file order, as vLLM's own loaders give
    them. pipeline_parallel: the model is one stage; only tensors under modules it holds are read (stage_filter).
    """
    keep = stage_filter(model) if pipeline_parallel else None
    if group is not None and dist.get_world_size(group) > 1 and not checkpoint.manifest:
        return SharedStream(checkpoint, group, device=device, filter=keep, **kwargs)  # type: ignore[arg-type]
    if group is not None and checkpoint.manifest:
        log.info("%s: a sha256 manifest is checked on whole files: every rank reads the whole checkpoint", checkpoint.url)
    return checkpoint.stream(device=device, filter=keep)
