"""Read once per node: the ranks of a real gloo group each fetch a disjoint share and exchange tensors, so every
rank gets every tensor whole (byte for byte what safetensors loads) while the group fetches the checkpoint once."""

from __future__ import annotations

import math
import multiprocessing
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.weightstream.conftest import assert_same, every_dtype_tensors, random_tensor, write_checkpoint
from weightstream.format import TensorInfo
from weightstream.readonce import plan_windows

KiB = 1024
PG_TIMEOUT = 30  # seconds: a test that waits this long on a collective has hung


# -- the plan (pure) ------------------------------------------------------------------------------------------------
def _infos(sizes: list[tuple[int, ...]]) -> list[TensorInfo]:
    infos, offset = [], 0
    for i, shape in enumerate(sizes):
        n = math.prod(shape) * 4
        infos.append(TensorInfo(f"t{i}", "F32", shape, offset, offset + n))
        offset += n
    return infos


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_assigns_every_byte_once_and_balances(world):
    shapes = [(1000, 300), (7,), (), (0, 5), (64, 64), (1, 200_000), (3000, 100), *[(50, 50)] * 13, (2, 9)]
    infos = _infos(shapes)
    windows = plan_windows(infos, world, window_bytes=512 * KiB, split_bytes=128 * KiB)
    assert [t.name for w in windows for t in w.tensors] == [t.name for t in infos]  # file order, each once
    load = [0] * world
    for window in windows:
        assert window.nbytes <= 512 * KiB or len(window.tensors) == 1
        covered: dict[int, list[tuple[int, int]]] = {}
        for share in window.shares:
            covered.setdefault(share.tensor, []).append((share.start, share.stop))
            load[share.owner] += share.nbytes
        for index, info in enumerate(window.tensors):
            spans = sorted(covered.get(index, []))
            assert sum(b - a for a, b in spans) == info.nbytes, info.name
            assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)), info.name
        for rank in range(world):  # a rank's pack holds its shares at aligned, non-overlapping offsets
            ends = [offset + s.nbytes for s, offset in window.layout[rank]]
            starts = [offset for _, offset in window.layout[rank]]
            assert all(o % 256 == 0 for o in starts) and all(e <= s for e, s in zip(ends, starts[1:], strict=False))
    total = sum(t.nbytes for t in infos)
    assert sum(load) == total
    assert max(load) - min(load) <= 800_000 * 4 // max(world, 1) + 200_000  # (1, 200000) cannot be split by rows
    assert plan_windows(infos, world, 512 * KiB, 128 * KiB)[3].shares == windows[3].shares  # deterministic


# -- ranks in real processes ------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, init: str, out: str, scenario: dict) -> None:
    import torch.distributed as dist

    from weightstream.readonce import SharedStream, model_stream

    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT)
    )
    result: dict = {"rank": rank}
    started = time.monotonic()
    stream = None
    try:
        url = scenario["url"]
        kwargs = dict(scenario.get("kwargs", {}))
        if scenario.get("fault_rank") == rank:  # this rank's data requests fail after a few good ones
            from tests.faultproxy import FaultProxy
            from tests.weightstream.conftest import is_data_range

            host, port = scenario["upstream"]
            proxy = FaultProxy((host, port), match=is_data_range)
            proxy.inject(*["pass"] * scenario.get("good", 2))
            proxy.always("500")  # with max_retries=0: a FetchError on the first failed range
            url = scenario["fault_url"].replace("ENDPOINT", proxy.endpoint)
        if scenario.get("filter_rank") == rank:
            kwargs["filter"] = lambda name: name != "w0"
        if "module" in scenario:
            import weightstream

            module = _module(scenario["module"])
            loaded = weightstream.load_into(module, url, strict=False, group=dist.group.WORLD, **kwargs)
            result["state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            result["stats"] = vars(loaded.stats)
        elif "stage" in scenario:
            import weightstream

            model = _stage_model(scenario["stage"])
            with weightstream.open(url) as checkpoint:
                stream = model_stream(checkpoint, model, device="cpu", group=dist.group.WORLD, pipeline_parallel=True)
                result["names"] = model.load_weights(stream)
            result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result["stats"] = vars(stream.stats)
        else:
            stream = SharedStream(url, dist.group.WORLD, **kwargs)
            state = {}
            for count, (name, tensor) in enumerate(stream):
                state[name] = tensor
                if scenario.get("die_rank") == rank and count == 1:
                    os._exit(3)  # the process dies mid-way, holding its share
                if scenario.get("stop_rank") == rank and count == 1:
                    break  # the consumer gives up mid-way
            result["state"] = state
            result["stats"] = vars(stream.stats)
    except Exception as e:  # the parent checks which rank failed how
        result["error"] = f"{type(e).__name__}: {e}"
        result["delivered"] = stream.stats.tensors if stream is not None else 0
        result["traceback"] = traceback.format_exc()
    result["seconds"] = time.monotonic() - started
    torch.save(result, out)
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, world: int, scenario: dict, timeout: float = 120) -> list[dict]:
    """`world` spawned processes in one gloo group; each rank's result (state, stats or error)."""
    context = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    init = str(tmp_path / f"init-{time.monotonic_ns()}")
    processes = [context.Process(target=_rank_main, args=(r, world, init, outs[r], scenario)) for r in range(world)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(1, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running after {timeout}s: a hang"
    return [torch.load(out) if os.path.exists(out) else {"exitcode": p.exitcode} for out, p in zip(outs, processes, strict=True)]


def _tensors(seed: int, count: int) -> dict[str, torch.Tensor]:
    """Odd sizes and shapes: tensors split by rows, tensors sent whole, every dtype, empty and scalar ones."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"w{i}": random_tensor((97 + 13 * i, 301), torch.float32, generator) for i in range(count)}
    tensors.update({f"b{i}": random_tensor((3 + i,), torch.bfloat16, generator) for i in range(count)})
    tensors.update(every_dtype_tensors(seed))
    return tensors


SMALL = {"window_bytes": 256 * KiB, "split_bytes": 64 * KiB}


def _data_bytes(directory: Path) -> int:
    return sum(t.numel() * t.element_size() for f in directory.glob("*.safetensors") for t in load_file(str(f)).values())


def _expected(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.mark.parametrize(("world", "source"), [(2, "s3"), (4, "s3"), (4, "file")])
def test_every_rank_gets_every_tensor_and_the_group_fetches_the_checkpoint_once(tmp_path, s3_prefix, world, source):
    directory = tmp_path / "ckpt"
    write_checkpoint(directory, _tensors(world, 9), shards=2)  # 9 + 9 + 70 tensors: no world divides them evenly
    if source == "s3":
        s3_prefix.upload(directory)
        url = s3_prefix.url()
    else:
        url = str(directory)
    results = run_ranks(tmp_path, world, {"url": url, "kwargs": SMALL})
    expected = _expected(directory)
    total = _data_bytes(directory)
    for result in results:
        assert "error" not in result, result.get("traceback")
        assert_same(result["state"], expected)
        assert result["stats"]["tensors"] == len(expected)
    fetched = [r["stats"]["bytes_fetched"] for r in results]
    assert sum(fetched) == total  # 1.0x the checkpoint's data (headers: one probe per file per rank, not counted)
    assert max(fetched) < 1.5 * total / world  # balanced shares
    received = [r["stats"]["bytes_received"] for r in results]
    assert all(fetched[r] + received[r] == total for r in range(world))


@pytest.mark.parametrize("shape", [(768, 1024), (1, 786432)], ids=["rows", "one-row"])
def test_a_single_huge_tensor_is_streamed_by_its_owners_and_broadcast_in_pieces(tmp_path, s3_prefix, shape):
    generator = torch.Generator().manual_seed(5)
    directory = tmp_path / "ckpt"
    write_checkpoint(directory, {"huge": random_tensor(shape, torch.float32, generator)})  # 3 MiB, windows of 256 KiB
    s3_prefix.upload(directory)
    results = run_ranks(tmp_path, 2, {"url": s3_prefix.url(), "kwargs": SMALL})
    expected = _expected(directory)
    for result in results:
        assert "error" not in result, result.get("traceback")
        assert_same(result["state"], expected)
    fetched = sorted(r["stats"]["bytes_fetched"] for r in results)
    assert fetched == ([3 * 2**19, 3 * 2**19] if shape[0] > 1 else [0, 3 * 2**20])


def _fault_scenario(tmp_path: Path, s3_prefix) -> dict:
    from urllib.parse import urlsplit

    directory = tmp_path / "ckpt"
    write_checkpoint(directory, _tensors(11, 12))
    s3_prefix.upload(directory)
    endpoint = urlsplit(s3_prefix.server.endpoint)
    return {
        "url": s3_prefix.url(),
        "fault_url": s3_prefix.url(endpoint="ENDPOINT"),
        "upstream": (endpoint.hostname, endpoint.port),
        "kwargs": {**SMALL, "max_retries": 0, "range_size": 64 * KiB, "concurrency": 2},
    }


def test_a_rank_whose_fetch_fails_midway_fails_the_others_at_once_with_a_clear_error(tmp_path, s3_prefix):
    scenario = {**_fault_scenario(tmp_path, s3_prefix), "fault_rank": 1, "good": 10}
    results = run_ranks(tmp_path, 3, scenario)
    assert "FetchError" in results[1]["error"] and "500" in results[1]["error"], results[1]
    assert results[0]["delivered"] > 0  # mid-way: windows had been exchanged before the failure
    for rank in (0, 2):
        assert "rank(s) [1] of the group failed or stopped" in results[rank]["error"], results[rank]
        assert results[rank]["seconds"] < PG_TIMEOUT / 2  # told by the status exchange, not by a timeout


def test_a_rank_that_stops_consuming_midway_releases_the_others(tmp_path, s3_prefix):
    scenario = {**_fault_scenario(tmp_path, s3_prefix), "stop_rank": 0}
    results = run_ranks(tmp_path, 2, scenario)
    assert "error" not in results[0] and len(results[0]["state"]) == 2
    assert "rank(s) [0] of the group failed or stopped" in results[1]["error"], results[1]
    assert results[1]["seconds"] < PG_TIMEOUT / 2


def test_a_rank_that_dies_midway_gives_the_others_a_clear_error_not_a_hang(tmp_path, s3_prefix):
    scenario = {**_fault_scenario(tmp_path, s3_prefix), "die_rank": 1}
    started = time.monotonic()
    results = run_ranks(tmp_path, 2, scenario, timeout=PG_TIMEOUT * 3)
    assert results[1] == {"exitcode": 3}
    assert "exchange with the group failed" in results[0]["error"] and "peer rank died or stalled" in results[0]["error"]
    assert time.monotonic() - started < PG_TIMEOUT * 2.5


def test_ranks_that_disagree_about_the_selection_fail_instead_of_exchanging_wrong_bytes(tmp_path, s3_prefix):
    scenario = {**_fault_scenario(tmp_path, s3_prefix), "filter_rank": 1}
    results = run_ranks(tmp_path, 2, scenario)
    for result in results:
        assert "disagree about what to read" in result["error"], result


# -- load_into and the vLLM adapter ------------------------------------------------------------------------------------
class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(301, 200, bias=False)
        self.norm = torch.nn.Parameter(torch.zeros(200))


def _module(layers: list[int]) -> torch.nn.Module:
    """A model holding only `layers` (a pipeline stage); the others are parameterless stand-ins (nn.Identity)."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([_Layer() if i in layers else torch.nn.Identity() for i in range(4)])
    return model


def _stage_model(layers: list[int]) -> torch.nn.Module:
    model = _module(layers)

    def load_weights(weights) -> set[str]:  # vLLM's interface: (name, full tensor) pairs -> names loaded
        params = dict(model.named_parameters())
        loaded = set()
        for name, tensor in weights:
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded

    model.load_weights = load_weights
    return model


def _layer_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(77)
    tensors = {}
    for i in range(4):
        tensors[f"layers.{i}.proj.weight"] = random_tensor((200, 301), torch.float32, generator)
        tensors[f"layers.{i}.norm"] = random_tensor((200,), torch.float32, generator)
    write_checkpoint(directory, tensors, shards=2)
    return tensors


def test_load_into_with_a_group_reads_only_the_modules_tensors_once(tmp_path, s3_prefix):
    directory = tmp_path / "ckpt"
    tensors = _layer_checkpoint(directory)
    s3_prefix.upload(directory)
    results = run_ranks(tmp_path, 2, {"url": s3_prefix.url(), "module": [1, 2]})
    wanted = {k: v for k, v in tensors.items() if k.startswith(("layers.1.", "layers.2."))}
    for result in results:
        assert "error" not in result, result.get("traceback")
        assert_same(result["state"], wanted)
    assert sum(r["stats"]["bytes_fetched"] for r in results) == sum(t.numel() * 4 for t in wanted.values())


def test_the_vllm_adapter_feeds_load_weights_whole_tensors_of_its_stage_only(tmp_path, s3_prefix):
    directory = tmp_path / "ckpt"
    tensors = _layer_checkpoint(directory)
    s3_prefix.upload(directory)
    results = run_ranks(tmp_path, 2, {"url": s3_prefix.url(), "stage": [0, 1]})
    wanted = {k: v for k, v in tensors.items() if k.startswith(("layers.0.", "layers.1."))}
    for result in results:
        assert "error" not in result, result.get("traceback")
        assert result["names"] == set(wanted)  # layers 2 and 3 belong to the other stage: never delivered
        assert_same(result["state"], wanted)
    assert sum(r["stats"]["bytes_fetched"] for r in results) == sum(t.numel() * 4 for t in wanted.values())
