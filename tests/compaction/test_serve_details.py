"""The live reader's mapping of Serve's instance details (built with Ray's own schema classes, serialized as
the Serve controller does), and the `compact run`/`plan` flags for warm-up, migration caps and budget windows."""

from __future__ import annotations

import pytest

from liftoff import cli as liftoff_cli
from serve_integration.compaction import cli
from serve_integration.compaction.cluster import serve_model
from serve_integration.compaction.model import ClusterState, Node
from serve_integration.compaction.planner import Budget, BudgetWindow, plan

pytest.importorskip("ray")

NOW = 1_000_000.0
HEAD, E1, L1, L2 = "aa" * 28, "bb" * 28, "cc" * 28, "dd" * 28


def _replica(rid: str, node: str | None, started: float, state: str = "RUNNING"):
    from ray.serve._private.common import ReplicaState
    from ray.serve.schema import ReplicaDetails

    return ReplicaDetails(
        replica_id=rid,
        state=ReplicaState(state),
        start_time_s=started,
        node_id=node,
        actor_name=f"SERVE_REPLICA::{rid}",
        actor_id="ff" * 16,
    )


def _deployment(name: str, gpus: float, replicas: list, mrpn: int | None = None):
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
    from ray.serve.schema import DeploymentDetails, DeploymentSchema

    opts = {"num_cpus": 0.0, "num_gpus": gpus}
    extra = {"max_replicas_per_node": mrpn} if mrpn else {}
    cfg = DeploymentSchema(
        name=name, num_replicas=len(replicas), ray_actor_options=opts, graceful_shutdown_timeout_s=3.0, **extra
    )
    return DeploymentDetails(
        name=name,
        status=DeploymentStatus.HEALTHY,
        status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
        message="",
        deployment_config=cfg,
        target_num_replicas=len(replicas),
        required_resources={"CPU": 0.0, "GPU": gpus},
        replicas=replicas,
    )


def _app(name: str, dep):
    from ray.serve.schema import APIType, ApplicationDetails, ApplicationStatus

    return ApplicationDetails(
        name=name,
        route_prefix=f"/{name}",
        docs_path=None,
        status=ApplicationStatus.RUNNING,
        message="",
        last_deployed_time_s=NOW - 900,
        source=APIType.DECLARATIVE,
        deployments={dep.name: dep},
        external_scaler_enabled=False,
    )


def _details() -> dict:
    """What `ServeController.get_serve_instance_details` returns for: chat (1 GPU, one per node) started
    100 s and 1000 s ago; embed started long ago, one replica starting and one not yet placed on a node."""
    from ray.serve.schema import ServeInstanceDetails

    chat = _deployment("chat", 1.0, [_replica("c1", E1, NOW - 100), _replica("c2", L1, NOW - 1000)], mrpn=1)
    embed = _deployment(
        "embed",
        1.0,
        [
            _replica("m1", L1, NOW - 5000),
            _replica("m2", L1, 0.0, "STARTING"),
            _replica("m3", None, 0.0, "STARTING"),
        ],
    )
    details = ServeInstanceDetails(proxies={}, applications={"chat": _app("chat", chat), "embed": _app("embed", embed)})
    return details._get_user_facing_json_serializable_dict(exclude_unset=True)


def test_replica_start_times_and_load_times_come_from_serve_details():
    deps, reps, used = serve_model(_details(), {}, load_time_s=300.0, load_times={"embed/embed": 60.0})
    assert deps["chat/chat"].load_time_s == 300.0 and deps["embed/embed"].load_time_s == 60.0
    assert deps["chat/chat"].max_replicas_per_node == 1 and deps["chat/chat"].demand == {"GPU": 1.0}
    by_id = {r.replica_id: r for r in reps}
    assert set(by_id) == {"c1", "c2", "m1", "m2"}  # m3 is not placed yet
    assert (by_id["c1"].node_id, by_id["c1"].state, by_id["c1"].ready_at) == (E1, "RUNNING", NOW - 100)
    assert by_id["m2"].state == "STARTING" and by_id["m2"].ready_at is None  # Serve has not started it yet
    assert used == {E1: {"GPU": 1.0}, L1: {"GPU": 3.0}}  # c2, m1 and the starting m2 hold their GPUs
    assert serve_model(_details(), {})[0]["chat/chat"].load_time_s == 0.0  # the library default: no warm-up


def test_a_replica_started_within_its_load_time_keeps_its_node():
    deps, reps, _ = serve_model(_details(), {}, load_time_s=300.0)
    reps = [r for r in reps if r.deployment == "chat/chat"]
    deps = {"chat/chat": deps["chat/chat"]}
    nodes = {
        HEAD: Node(HEAD, 0.5, {"CPU": 4.0}, is_head=True),
        E1: Node(E1, 8.0, {"CPU": 8.0, "GPU": 2.0}),
        L1: Node(L1, 2.0, {"CPU": 8.0, "GPU": 4.0}),
        L2: Node(L2, 2.0, {"CPU": 8.0, "GPU": 4.0}),  # chat runs one replica per node: c1 can only go here
    }
    st = ClusterState(nodes, deps, reps, taken_at=NOW)
    free = Budget(min_healthy_fraction=0.0, max_price_ratio=0.0)
    p = plan(st, free)
    assert p.remove == [L2] and "replica c1 of chat/chat is still warming up" in p.blocked[E1]
    later = ClusterState(nodes, deps, reps, taken_at=NOW + 250)  # c1 up for 350 s
    assert plan(later, free).remove == [E1]


def _parse(*argv: str):
    return liftoff_cli.build_parser(["compact", "plan"]).parse_args(["compact", "plan", *argv])


def test_budget_flags_reach_the_planner_and_the_reader():
    args = _parse(
        "--max-migrations", "3", "--budget", "09:00-18:00=0", "--budget", "22:00-06:00=1",
        "--warmup-seconds", "120", "--warmup-seconds", "chat/chat=900",
    )  # fmt: skip
    b = cli._budget(args)
    assert b.max_migrations == 3
    assert b.windows == (BudgetWindow(9 * 3600.0, 18 * 3600.0, 0), BudgetWindow(22 * 3600.0, 6 * 3600.0, 1))
    assert b.at(12 * 3600).max_migrations == 0 and b.at(23 * 3600).max_migrations == 1 and b.at(20 * 3600).max_migrations == 3
    assert cli._warmup(args) == (120.0, {"chat/chat": 900.0})
    default = _parse()
    assert cli._budget(default).max_migrations is None and cli._budget(default).windows == ()
    assert cli._warmup(default) == (cli.DEFAULT_WARMUP_S, {})
    assert cli._warmup(_parse("--warmup-seconds", "0")) == (0.0, {})


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--budget", "09:00-18:00"], "expected HH:MM-HH:MM=MAX_MIGRATIONS"),
        (["--budget", "9-18=0"], 'expected "HH:MM-HH:MM"'),
        (["--budget", "09:00-25:00=0"], "not a time of day"),
        (["--budget", "09:00-18:00=-1"], "whole number of migrations >= 0"),
        (["--budget", "09:00-18:00=x"], "whole number of migrations >= 0"),
        (["--max-migrations", "-2"], "whole number of migrations >= 0"),
        (["--warmup-seconds", "soon"], "SECONDS >= 0 or APP/DEPLOYMENT=SECONDS"),
        (["--warmup-seconds", "-5"], "SECONDS >= 0 or APP/DEPLOYMENT=SECONDS"),
        (["--warmup-seconds", "chat=900"], "SECONDS >= 0 or APP/DEPLOYMENT=SECONDS"),
        (["--warmup-seconds", "=900"], "SECONDS >= 0 or APP/DEPLOYMENT=SECONDS"),
        (["--warmup-seconds", "chat/chat=inf"], "SECONDS >= 0 or APP/DEPLOYMENT=SECONDS"),
    ],
)
def test_bad_budget_flags_are_one_clear_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and needle in lines[0] and argv[0] in lines[0], err
