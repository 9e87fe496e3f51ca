"""SIGKILL while prepares (and commits, removes) are in flight: after a restart, the database is sound,
every snapshot has exactly its directory, every acknowledged change survived, and interrupted ones
either happened completely or not at all."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time

import grpc

from layerstore.pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.snapshotter.helpers import code_of, db_state

NAMESPACE = "crash"


def hammer(proc, round_no: int, worker: int, expected: dict, uncertain: set, interrupted: list, lock: threading.Lock):
    """Prepare, commit and remove snapshots until the server dies; record what was acknowledged."""
    client = proc.client(NAMESPACE)
    try:
        for i in range(100000):
            key = f"r{round_no}-w{worker}-{i}"
            steps = [("prepare", key)]
            if i % 2:
                steps.append(("commit", key))
            if i % 3 == 0:
                steps.append(("remove", key + "-c" if i % 2 else key))
            for op, name in steps:
                touched = {name, name + "-c"}
                try:
                    if op == "prepare":
                        client.prepare(name, parent="base", labels={"round": str(round_no)})
                    elif op == "commit":
                        client.commit(name + "-c", name)
                    else:
                        client.remove(name)
                except grpc.RpcError as e:
                    with lock:
                        uncertain.update(touched)
                        interrupted.append((op, e.code()))
                    return
                with lock:
                    if op == "prepare":
                        expected[name] = pb.ACTIVE
                    elif op == "commit":
                        expected.pop(name)
                        expected[name + "-c"] = pb.COMMITTED
                    else:
                        expected.pop(name)
    finally:
        client.close()


def check_state(proc, expected: dict, uncertain: set) -> None:
    rows, _ = db_state(proc.root)
    snapshots = proc.root / "snapshots"
    assert sorted(os.listdir(snapshots)) == sorted(str(r[0]) for r in rows), "directories differ from snapshot rows"
    for sid, _ns, _key, kind, *_ in rows:
        assert (snapshots / str(sid) / "fs").is_dir()
        if kind == pb.ACTIVE:
            assert (snapshots / str(sid) / "work").is_dir()
    client = proc.client(NAMESPACE)
    try:
        for name, kind in expected.items():
            if name not in uncertain:
                assert client.stat(name).kind == kind, name
        listed = {info.name: info.kind for info in client.list()}
        for name in set(listed) - set(expected):
            assert name in uncertain or name == "base", f"{name} exists but was never acknowledged"
        for name in uncertain:
            if name in listed and listed[name] == pb.ACTIVE:
                (mount,) = client.mounts(name)  # an interrupted prepare that happened is whole
                upper = next(o for o in mount.options if o.startswith("upperdir=")).split("=", 1)[1]
                assert os.path.isdir(upper)
    finally:
        client.close()


def test_sigkill_during_prepares(fresh_snapshotter):
    proc = fresh_snapshotter
    client = proc.client(NAMESPACE)
    client.prepare("base-active")
    client.commit("base", "base-active")
    client.close()
    expected: dict[str, int] = {"base": pb.COMMITTED}
    uncertain: set[str] = set()
    interrupted: list = []
    lock = threading.Lock()
    rng = random.Random(1)

    for round_no in range(3):
        threads = [
            threading.Thread(target=hammer, args=(proc, round_no, w, expected, uncertain, interrupted, lock)) for w in range(4)
        ]
        for t in threads:
            t.start()
        time.sleep(0.3 + rng.random() * 0.4)
        proc.kill()
        for t in threads:
            t.join(30)
            assert not t.is_alive()

        # the database exactly as the killed process left it
        conn = sqlite3.connect(proc.root / "metadata.db")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        finally:
            conn.close()

        proc.start()
        check_state(proc, expected, uncertain)

    assert len(expected) > 20, "too few operations were acknowledged to mean anything"
    assert any(op == "prepare" for op, _ in interrupted), f"no prepare was in flight at a kill: {interrupted}"
    assert all(code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) for _, code in interrupted), interrupted

    # the restarted service works: new ids do not collide with anything left behind
    client = proc.client(NAMESPACE)
    for i in range(5):
        client.prepare(f"after-{i}", parent="base")
    assert code_of(client.prepare, "after-0")[0] == grpc.StatusCode.ALREADY_EXISTS
    client.close()
    assert proc.stop() == 0
