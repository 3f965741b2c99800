"""The global scheduler: one synchronous object, keyed by instance id, that makes every cluster
decision for the Ray cluster and the simulator alike."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from shoal.control import policies
from shoal.control.global_scheduler import GlobalScheduler
from shoal.engine.metadata import RequestMetadata
from shoal.engine.outputs import InstanceLoad

ROOT = Path(__file__).resolve().parent.parent / "shoal"


def load(free=100, running=0, waiting=0, waiting_tokens=0, total=128) -> InstanceLoad:
    return InstanceLoad(num_running=running, num_waiting=waiting, num_swapped=0, num_total_blocks=total,
                        num_free_blocks=free, num_used_blocks=total - free, num_cached_blocks=0,
                        num_pinned_blocks=0, block_size=16, tokens_in_flight=0,
                        waiting_prompt_tokens=waiting_tokens, num_preemptions=0, max_num_seqs=16)


def cluster(*roles: str, dispatch=None, **kw) -> GlobalScheduler:
    gs = GlobalScheduler(dispatch or policies.LeastLoad(), **kw)
    for i, role in enumerate(roles):
        gs.add_instance(i, role, load())
    return gs


def imports_of(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_the_control_package_imports_neither_ray_nor_asyncio_and_sim_not_the_cluster():
    control = imports_of("control")
    assert not any(n.split(".")[0] in ("ray", "asyncio", "time") for n in control), control
    assert not any(n.startswith("shoal.cluster") for n in imports_of("sim"))
    assert "shoal.control.global_scheduler" in imports_of("sim") and "shoal.control.global_scheduler" in imports_of("cluster")


def test_a_burst_is_spread_before_any_snapshot_comes_back():
    """Each dispatch is counted at once, so 16 concurrent arrivals on 2 idle instances split 8 / 8
    (they used to land 16 / 0: every arrival saw the same snapshot)."""
    gs = cluster("both", "both")
    req = policies.DispatchRequest("r", list(range(64)))
    chosen = [gs.dispatch(req) for _ in range(16)]
    assert chosen.count(0) == chosen.count(1) == 8
    gs.undo_dispatch(0, req)
    assert gs.instances[0].load.num_waiting == 7
    gs.observe(0, load(waiting=1))  # a snapshot taken before the adds landed keeps them counted
    assert gs.instances[0].load.num_waiting == 8 and gs.instances[0].load.waiting_prompt_tokens == 7 * 64
    landed = dataclasses.replace(load(running=8), num_added=7)  # one that counts them replaces the bump
    gs.observe(0, landed)
    assert gs.instances[0].load == landed


@pytest.mark.parametrize("policy", [policies.PrefixAware(block_size=16), policies.SessionAffinity()])
def test_affinity_follows_instance_ids_after_a_death(policy):
    """Affinity is remembered by instance id: after another instance dies, a prompt (or session)
    still goes to the instance that holds its KV, not to whichever now sits at its list position."""
    gs = cluster("both", "both", "both", dispatch=policy)
    prompt = list(range(64))
    gs.observe(0, load(free=50, running=2))
    gs.observe(1, load(free=50, running=2))
    first = gs.dispatch(policies.DispatchRequest("a", prompt, RequestMetadata(session_id="s")))
    assert first == 2
    for i in gs.instances:
        gs.observe(i, load())
    gs.remove_instance(0)  # instance 2 is now second in line, not third
    assert gs.dispatch(policies.DispatchRequest("b", prompt + [1, 2], RequestMetadata(session_id="s"))) == first
    gs.remove_instance(first)  # its home is gone: served elsewhere, no error
    assert gs.dispatch(policies.DispatchRequest("c", prompt, RequestMetadata(session_id="s"))) in gs.instances


def test_dispatch_skips_draining_decode_only_and_dead_instances():
    gs = cluster("decode", "both", "prefill", "both")
    gs.set_draining(3)
    gs.remove_instance(1)
    assert {gs.dispatch(policies.DispatchRequest(f"r{i}", [1, 2])) for i in range(4)} == {2}
    gs.remove_instance(2)
    with pytest.raises(RuntimeError, match="no live instance"):
        gs.dispatch(policies.DispatchRequest("x", [1]))


def test_pd_destination_and_drain_target():
    gs = cluster("prefill", "decode", "both", "decode")
    gs.observe(1, load(free=40))
    gs.observe(2, load(free=90, waiting_tokens=16 * 60))  # 60 blocks queued: room 30
    gs.observe(3, load(free=70))
    assert gs.pd_destination() == 3  # decode room net of its queue: 2 has 90 free but 60 queued
    assert gs.drain_target(3) == 2  # most free blocks among the other decode-capable ones
    assert gs.drain_target(0) is None  # a prefill instance hands off instead of migrating
    gs.set_draining(2)
    assert gs.drain_target(3) == 1


def test_migration_plan_is_keyed_by_id():
    gs = cluster("both", "both", "both", migration=policies.LlumnixMigration())
    gs.remove_instance(0)  # ids 1 and 2 remain
    running = {1: tuple(policies.RunningRequest(x, 0, 100 + n) for n, x in enumerate("abc")),
               2: (policies.RunningRequest("d", 0, 50),)}
    gs.observe(1, dataclasses.replace(load(free=1, running=3), running=running[1]))  # the batch rides on the snapshot
    gs.observe(2, dataclasses.replace(load(free=100, running=1), running=running[2]))
    plan = gs.migration_plan()
    assert [(m.req_id, m.src, m.dst, m.reason) for m in plan] == [("a", 1, 2, "relieve")]
    assert [m.req_id for m in gs.migration_plan(exclude={"a"})] == ["b"]  # already moving: not planned again
    assert GlobalScheduler(policies.LeastLoad()).migration_plan() == []  # no migration policy


def test_scale_down_picks_a_removable_idle_victim():
    scaler = policies.Autoscaler(min_instances=1, max_instances=4, up=0.9, down=0.5, window=1)
    gs = cluster("prefill", "decode", "both", autoscaler=scaler)
    gs.observe(0, load(running=0))
    gs.observe(1, load(running=3))
    gs.observe(2, load(running=1))
    # removing the prefill instance (idle) leaves decode + both: still serving
    assert gs.scale() == (-1, 0)
    gs.remove_instance(0)
    # both is the only one taking new requests: only the decode instance may go
    assert gs.scale() == (-1, 1)
    assert GlobalScheduler(policies.LeastLoad()).scale() == (0, None)


@pytest.mark.parametrize("dispatch", ["least_load", "predicted_latency"])
def test_dispatch_counts_only_the_work_ahead_of_the_request_s_priority(dispatch):
    """Instance 0 runs twelve background (priority 5) requests, instance 1 four of priority 0. A
    request of priority 0 goes to instance 0, whose background work yields to it; another
    background one goes to instance 1."""
    from shoal.engine.outputs import RunningRequest
    from shoal.engine.cost_model import LinearCostModel, default_profile_path
    from shoal.control.predictor import InstanceProfile

    profiles = {i: InstanceProfile(LinearCostModel.load(default_profile_path()), 512) for i in (0, 1)}
    gs = cluster("both", "both", dispatch=policies.make_dispatch_policy(dispatch, profiles), profiles=profiles)
    background = tuple(RunningRequest(f"b{i}", 5, 300) for i in range(12))
    normal = tuple(RunningRequest(f"n{i}", 0, 300) for i in range(4))
    gs.observe(0, dataclasses.replace(load(free=512 - 12 * 19, running=12, total=512), running=background, tokens_in_flight=3600))
    gs.observe(1, dataclasses.replace(load(free=512 - 4 * 19, running=4, total=512), running=normal, tokens_in_flight=1200))
    prompt = list(range(32))
    assert gs.dispatch(policies.DispatchRequest("urgent", prompt, RequestMetadata(priority=0))) == 0
    other = list(range(100, 132))  # not the prefix just sent to 0
    assert gs.dispatch(policies.DispatchRequest("bulk", other, RequestMetadata(priority=5))) == 1
    view = policies.priority_view(gs.instances[0].load, 0)
    assert view.num_running == 0 and view.running == () and view.num_free_blocks > gs.instances[0].load.num_free_blocks
