"""The route table (``fastpeft.routing``): measured choice, pins, the cache file, and the per-op tables.

That each route computes the same thing is tested op by op in ``test_cpu_backend.py`` / ``test_cpu_quant.py``
(every route pinned in turn against the reference); here: how a route is chosen and remembered.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import threading
import time
import warnings

import pytest
import torch
from checks import assert_close

from fastpeft import routing as routes


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty route table and cache file for one test; pins removed afterwards."""
    path = tmp_path / "routes.json"
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", str(path))
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 0)  # the first measurement is final (the confirming
    routes.clear_choices()                                  # measurement has its own test)
    yield path
    routes.set_route(None, None)
    routes.clear_choices()


def key(m=64, op="lora_forward"):
    return routes.make_key(op, "cpu", "dense", torch.float32, torch.float32, [torch.float32], m, 96, 80, False, 16, 1)


def test_fastest_candidate_is_chosen_and_kept(fresh):
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        torch.randn(300, 300) @ torch.randn(300, 300)
        return "slow"

    def fast():
        calls["fast"] += 1
        return "fast"

    candidates = {"compose": slow, "fused": fast}
    assert routes.run(key(), candidates) == "fast"
    measured = dict(calls)
    assert measured["slow"] >= 2 and measured["fast"] >= 2, "each candidate is warmed up and timed"
    for _ in range(3):
        assert routes.run(key(), candidates) == "fast"
    assert calls["slow"] == measured["slow"], "a kept choice runs no other candidate"
    (row,) = routes.routes()
    assert row["route"] == "fused" and row["source"] == "measured"
    assert set(row["timings_ms"]) == {"compose", "fused"} and row["timings_ms"]["fused"] < row["timings_ms"]["compose"]


def test_choice_is_written_and_read_back_from_the_cache_file(fresh):
    routes.run(key(), {"compose": lambda: 1, "fused": lambda: (torch.randn(200, 200) @ torch.randn(200, 200), 2)[1]})
    data = json.loads(fresh.read_text())
    assert data["version"] == routes.CACHE_VERSION
    (machine,) = data["machines"]
    assert machine == routes.machine_fingerprint("cpu")
    assert data["machines"][machine][key().as_string()]["route"] == "compose"
    routes.clear_choices()  # a new process: only the file remembers
    ran = []
    assert routes.run(key(), {"compose": lambda: ran.append("compose") or 1,
                              "fused": lambda: ran.append("fused") or 2}) == 1
    assert ran == ["compose"], "the file's choice must be used without measuring again"
    assert routes.routes()[0]["source"] == "cache file"


def test_cache_of_another_machine_or_version_is_not_used(fresh):
    other = {"version": routes.CACHE_VERSION,
             "machines": {"cpu=other|isa=generic|threads=1|fastpeft=0|torch=0|bitsandbytes=none":
                          {key().as_string(): {"route": "compose", "timings_ms": {}}}}}
    fresh.write_text(json.dumps(other))
    routes.run(key(), {"compose": lambda: (torch.randn(200, 200) @ torch.randn(200, 200), 1)[1], "fused": lambda: 2})
    assert routes.routes()[0]["source"] == "measured"
    data = json.loads(fresh.read_text())
    assert len(data["machines"]) == 2, "the other machine's entries are kept"


def test_unreadable_cache_file_is_measured_again_and_rewritten(fresh):
    fresh.write_text("{not json")
    assert routes.run(key(), {"compose": lambda: 1, "fused": lambda: 1}) == 1
    assert json.loads(fresh.read_text())["version"] == routes.CACHE_VERSION


def test_cache_off_writes_nothing(fresh, monkeypatch):
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", "off")
    routes.run(key(), {"compose": lambda: 1, "fused": lambda: 1})
    assert routes.cache_path() is None and not fresh.exists()


def test_environment_pin_per_op_and_for_all(fresh, monkeypatch):
    monkeypatch.setenv("FASTPEFT_ROUTE", "lora_forward=gemv,lora_backward=small")
    assert routes.run(key(), {"compose": lambda: 1, "gemv": lambda: 2}) == 2
    assert routes.last_route("lora_forward") == "gemv"
    monkeypatch.setenv("FASTPEFT_ROUTE", "compose")
    assert routes.run(key(op="ia3_forward"), {"compose": lambda: 1, "gemv": lambda: 2}) == 1
    assert routes.routes() == [], "a pinned call measures nothing"


def test_pin_that_cannot_serve_a_call_is_reported_and_measured(fresh):
    routes.set_route("lora_forward", "gemv")
    assert routes.run(key(), {"compose": lambda: 1, "fused": lambda: 1}) == 1
    (row,) = routes.routes()
    assert "gemv" in row["note"] and row["pinned"] == "gemv"


@pytest.mark.parametrize("value", ["warp_speed", "lora_forward=small", "nosuchop=compose"])
def test_bad_pin_is_a_clear_error(fresh, monkeypatch, value):
    monkeypatch.setenv("FASTPEFT_ROUTE", value)
    with pytest.raises(ValueError, match="FASTPEFT_ROUTE"):
        routes.run(key(), {"compose": lambda: 1})


def test_set_route_rejects_unknown_names(fresh):
    with pytest.raises(ValueError, match="no route"):
        routes.set_route("lora_forward", "small")
    with pytest.raises(ValueError, match="unknown op"):
        routes.set_route("conv", "compose")


def test_failing_candidate_is_dropped_with_its_error(fresh):
    def broken():
        raise RuntimeError("kernel refuses")

    assert routes.run(key(), {"compose": broken, "fused": lambda: 3}) == 3
    (row,) = routes.routes()
    assert row["route"] == "fused" and "kernel refuses" in row["note"]
    with pytest.raises(RuntimeError, match="every route failed"):
        routes.run(key(m=1), {"compose": broken, "fused": broken})


def test_keys_bucket_rows_and_rank():
    assert key(m=33) == key(m=64) != key(m=65)
    assert routes.bucket(0) == routes.bucket(1) == 1 and routes.bucket(17) == 32


def test_threads_agree_on_one_choice(fresh):
    """Concurrent first calls of one key measure once and all run the same route."""
    seen = []
    candidates = {"compose": lambda: "compose", "fused": lambda: "fused"}

    def worker():
        seen.append(routes.run(key(), candidates))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and len(routes.routes()) == 1


def test_settled_names_the_route_run_would_take_without_measuring(fresh):
    assert routes.settled(key(), {"compose", "fused"}) is None
    routes.run(key(), {"compose": lambda: 1, "fused": lambda: 2})
    chosen = routes.last_route("lora_forward")
    assert routes.settled(key(), {"compose", "fused"}) == chosen
    routes.set_route("lora_forward", "gemv")
    assert routes.settled(key(), {"compose", "gemv"}) == "gemv"
    assert routes.settled(key(), {"compose", "fused"}) == chosen, "a pin that cannot serve yields to the choice"


def test_route_table_names_every_route_with_its_limits():
    table = routes.route_table()
    assert set(table["routes"]) == {"lora_forward", "lora_backward", "lora_update", "lora_mixed_forward", "ia3_forward",
                                    "ia3_backward", "dora_forward", "dora_backward", "widened_product",
                                    "gemv_prefetch", "lora_down", "lora_dy"}
    assert "compose" in table["routes"]["lora_forward"] and "bnb_native" in table["limits"]


def test_candidates_are_timed_in_interleaved_rounds(fresh):
    """One warm-up run of each candidate, then rounds that run every candidate once, so a change in the machine's
    load during measurement hits every route alike; the rounds' orders differ, so no route is always timed after the
    same one (whose traffic may have evicted the caches), and are the same in every measurement."""
    names = ["compose", "fused", "gemv", "small"]

    calls = []
    routes.run(key(), {name: (lambda name=name: calls.append(name) or name) for name in names})
    n = len(names)
    assert len(calls) == n * (1 + routes.TIMED_ROUNDS)
    assert calls[:n] == names, "warm-up in the table's order"
    rounds = [calls[n * (i + 1): n * (i + 2)] for i in range(routes.TIMED_ROUNDS)]
    assert all(sorted(r) == sorted(names) for r in rounds), rounds
    assert len({tuple(r) for r in rounds}) > 1, rounds
    for name in names:
        before = {calls[i - 1] for i in range(n, len(calls)) if calls[i] == name}
        assert len(before) >= 2, (name, rounds)
    again = []
    routes._time_candidates({name: (lambda name=name: again.append(name)) for name in names})
    assert again == calls, "the same orders in a second measurement"
    rows = routes.routes()
    assert len(rows) == 1 and set(rows[0]["timings_ms"]) == set(names)


def test_unmeasured_route_runs_without_timing_and_yields_to_a_pin(fresh):
    """Where timings mean nothing (Triton's interpreter) the caller names the route; nothing is timed or written to
    the cache file, and a pinned route still wins."""
    calls = []
    cands = {"compose": lambda: calls.append("compose") or 1, "passes": lambda: calls.append("passes") or 2}
    assert routes.run(key(), cands, unmeasured="passes") == 2
    assert calls == ["passes"] and not fresh.exists()
    (row,) = routes.routes()
    assert row["route"] == "passes" and row["source"] == "unmeasured"
    routes.set_route("lora_forward", "compose")
    assert routes.run(key(), cands, unmeasured="passes") == 1


# ------------------------------------------------------------------------- the cache file under faults and sharing
def key_n(n: int):
    return routes.make_key("lora_forward", "cpu", "dense", torch.float32, torch.float32, [torch.float32], 64, n, 80,
                           False, 16, 1)


def _store_keys(first: int, count: int, start) -> None:
    """A process of its own: wait for the others, then store ``count`` choices, one file update each."""
    start.wait()
    for n in range(first, first + count):
        routes._store_file("machine-of-the-test", key_n(n), routes.Choice("compose", "measured", {"compose": 0.1}))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_adding_different_keys_keep_all_of_them(fresh):
    """Processes that share the cache file (the ranks of one job) each re-read, update and rewrite it; every key
    either stores must be in the file at the end, and the file must be valid."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    children = [context.Process(target=_store_keys, args=(first, 40, start)) for first in (1000, 2000)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    stored = json.loads(fresh.read_text())["machines"]["machine-of-the-test"]
    want = {key_n(n).as_string() for n in list(range(1000, 1040)) + list(range(2000, 2040))}
    assert want - set(stored) == set(), f"{len(want - set(stored))} of 80 keys were lost"
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["routes.json", "routes.json.lock"]


DAMAGED = {
    "truncated": None,  # the first third of a valid file
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe\x00garbage",
    "a list": b"[1, 2, 3]",
    "other version": json.dumps({"version": routes.CACHE_VERSION + 1, "machines": {"m": {"k": {"route": "x"}}}}),
    "machines not a table": json.dumps({"version": routes.CACHE_VERSION, "machines": ["compose"]}),
    "entry not a choice": json.dumps({"version": routes.CACHE_VERSION,
                                      "machines": {"MACHINE": {"KEY": "fused"}}}),
    "route not a name": json.dumps({"version": routes.CACHE_VERSION,
                                    "machines": {"MACHINE": {"KEY": {"route": ["fused"], "timings_ms": {}}}}}),
    "timings not numbers": json.dumps({"version": routes.CACHE_VERSION,
                                       "machines": {"MACHINE": {"KEY": {"route": "fused", "timings_ms": [1]}}}}),
}


@pytest.mark.parametrize("damage", DAMAGED, ids=DAMAGED.keys())
def test_damaged_cache_file_is_ignored_with_one_warning_and_rebuilt(fresh, damage):
    x, w = torch.randn(5, 80), torch.randn(96, 80)
    candidates = {"compose": lambda: x @ w.T, "fused": lambda: torch.einsum("mk,nk->mn", x, w)}
    if DAMAGED[damage] is None:
        routes.run(key(m=1), candidates)
        data = fresh.read_bytes()
        fresh.write_bytes(data[: len(data) // 3])
        routes.clear_choices()
    else:
        text = DAMAGED[damage]
        if isinstance(text, str):
            text = text.replace("MACHINE", routes.machine_fingerprint("cpu")).replace("KEY", key().as_string())
            text = text.encode()
        fresh.write_bytes(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = routes.run(key(), candidates)
        routes.clear_choices()  # as a new choice would: the file is read again
        again = routes.run(key(m=2), candidates)
    assert_close("result with a damaged cache", out, x @ w.T, 1e-6)
    assert_close("result with a damaged cache", again, x @ w.T, 1e-6)
    mentions = [str(c.message) for c in caught if str(fresh) in str(c.message)]
    assert len(mentions) == 1 and "ignoring the route cache" in mentions[0], mentions
    data = json.loads(fresh.read_text())
    assert data["version"] == routes.CACHE_VERSION
    assert key().as_string() in data["machines"][routes.machine_fingerprint("cpu")], "the file was not rebuilt"


def test_unwritable_cache_location_keeps_choices_in_memory_silently(fresh, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", str(tmp_path / "a-file" / "routes.json"))
    calls = []
    candidates = {"compose": lambda: calls.append("compose") or 1, "fused": lambda: calls.append("fused") or 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert routes.run(key(), candidates) == 1
        measured = len(calls)
        assert routes.run(key(), candidates) == 1
    assert len(calls) == measured + 1, "the choice was not kept in memory"
    assert not [c for c in caught if "fastpeft" in str(c.message)]


def test_failed_cache_write_keeps_the_previous_file(fresh, monkeypatch):
    routes.run(key(m=1), {"compose": lambda: 1, "fused": lambda: 1})
    before = fresh.read_bytes()
    real_dump = json.dump

    def dump_a_third(obj, handle, **kwargs):
        text = json.dumps(obj, **kwargs)
        handle.write(text[: len(text) // 3])
        raise OSError(errno.ENOSPC, "simulated crash: no space left")

    monkeypatch.setattr(json, "dump", dump_a_third)
    assert routes.run(key(m=64), {"compose": lambda: 2, "fused": lambda: 2}) == 2
    monkeypatch.setattr(json, "dump", real_dump)
    assert fresh.read_bytes() == before
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["routes.json", "routes.json.lock"], "temporary files left"


def test_environment_reads_follow_os_environ(monkeypatch):
    """``fastpeft._env.read`` (how FASTPEFT_ROUTE and FASTPEFT_BACKEND are read on every call) sees every change made
    through ``os.environ``, as ``os.environ.get`` does, non-ASCII values included."""
    import os

    from fastpeft import _env

    name = "FASTPEFT_ENV_READ_CHECK"
    monkeypatch.delenv(name, raising=False)
    assert _env.read(name) is None
    for value in ("compose", "", "lora_forward=gemv, é"):
        monkeypatch.setenv(name, value)
        assert _env.read(name) == os.environ.get(name) == value
    monkeypatch.delenv(name)
    assert _env.read(name) is None


def sleeper(log: list, name: str, seconds: dict):
    """A candidate that records its run and sleeps ``seconds[phase]`` (the test sets ``seconds["phase"]``)."""
    def run():
        log.append(name)
        time.sleep(seconds[seconds["phase"]])
        return name
    return run


def test_a_first_choice_is_confirmed_by_timing_its_close_routes_in_real_calls(fresh, monkeypatch):
    """A choice timed at a key's first call (back to back, often while the process is busy starting) serves until
    the key's CONFIRM_AFTER_CALLS-th call; from then on each real call takes one of the routes that came within
    ROTATE_WITHIN of the fastest, timed, CALL_ROUNDS calls each, and the lowest median is kept and written to the
    cache file. A route far behind in the first measurement is not given real calls."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 3)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 3)
    log: list = []
    compose = {"phase": "first", "first": 0.004, "calls": 0.006}
    fused = {"phase": "first", "first": 0.005, "calls": 0.001}
    gemv = {"phase": "first", "first": 0.03, "calls": 0.0}
    candidates = {"compose": sleeper(log, "compose", compose), "fused": sleeper(log, "fused", fused),
                  "gemv": sleeper(log, "gemv", gemv)}
    assert routes.run(key(), candidates) == "compose"
    assert routes.routes()[0]["source"] == "measured" and not fresh.exists()
    for seconds in (compose, fused, gemv):
        seconds["phase"] = "calls"
    log.clear()
    for _ in range(2):  # calls 1 and 2 after the measurement keep its choice
        assert routes.run(key(), candidates) == "compose"
    assert routes.settled(key(), candidates) is None, "the third call times a route of the rotation"
    assert routes.take(key(), set(candidates)) is None
    assert routes.rotating(key(), candidates) in ("compose", "fused")
    rotated = [routes.run(key(), candidates) for _ in range(2 * routes.CALL_ROUNDS)]
    assert log[2:] == rotated, "each call runs one route, the one whose result it returns"
    assert sorted(rotated) == ["compose"] * 3 + ["fused"] * 3, "gemv was over ROTATE_WITHIN x the fastest"
    (row,) = routes.routes()
    assert row["route"] == "fused" and row["source"] == "measured in calls"
    assert set(row["timings_ms"]) == {"compose", "fused"} and row["timings_ms"]["fused"] < row["timings_ms"]["compose"]
    assert "first measurement" in row["note"]
    stored = json.loads(fresh.read_text())["machines"][routes.machine_fingerprint("cpu")]
    assert stored[key().as_string()]["route"] == "fused"
    assert routes.settled(key(), candidates) == "fused" and routes.rotating(key(), candidates) is None
    log.clear()
    for _ in range(5):
        assert routes.run(key(), candidates) == "fused"
    assert log == ["fused"] * 5, "a confirmed choice is not timed again"


def test_calls_of_an_op_inside_another_keys_measurement_are_not_counted(fresh, monkeypatch):
    """An op that the routes of another op call (``lora_down`` inside the forward's routes) runs many times while the
    outer key's candidates are timed: those calls take the inner choice as it is and do not count toward its
    confirmation, neither through ``run`` nor through ``take`` / ``TakenRoutes``; the inner key's real calls do."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 3)
    inner_key = key(op="lora_down")
    inner = {"rows": lambda: "rows", "transposed": lambda: "transposed"}
    inner_route = routes.run(inner_key, inner)
    (choice,) = [c for k, c in routes._choices.items() if k == inner_key]
    assert choice.source == "measured" and choice.calls == 0
    taken = routes.TakenRoutes({"lora_down": routes.settled_call(inner_key, set(inner))})

    def outer_route():
        assert routes.run(inner_key, inner) == inner_route
        assert routes.take(inner_key, set(inner)) == inner_route
        assert not taken.due()
        taken.served()
        return "outer"

    assert routes.run(key(), {"compose": outer_route, "fused": outer_route}) == "outer"
    assert routes._choices[inner_key] is choice and choice.calls == 0, "calls inside a measurement were counted"
    routes.run(inner_key, inner)
    taken.served()
    assert choice.calls == 2 and taken.due(), "the inner key's real calls count"


def test_a_probe_is_confirmed_by_a_second_measurement_not_in_calls(fresh, monkeypatch):
    """``run(in_calls=False)`` (a side measurement, not the call's own work) times every candidate back to back again
    at the due call, and that choice is final and written to the file; no call takes a route in turn."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 3)
    log: list = []
    seconds = {"phase": "t", "t": 0.0005}
    candidates = {name: sleeper(log, name, seconds) for name in ("compose", "fused")}
    chosen = routes.run(key(), candidates, in_calls=False)
    log.clear()
    assert [routes.run(key(), candidates, in_calls=False) for _ in range(2)] == [chosen] * 2 and log == [chosen] * 2
    assert routes.take(key(), set(candidates)) is None, "the third call is due"
    log.clear()
    routes.run(key(), candidates, in_calls=False)
    assert log.count("compose") >= 2 and log.count("fused") >= 2, "every candidate timed again"
    (row,) = routes.routes()
    assert row["source"] == "measured again" and not routes.unconfirmed()
    assert json.loads(fresh.read_text())["machines"][routes.machine_fingerprint("cpu")][key().as_string()]


def test_a_rotation_passes_over_routes_a_call_cannot_take(fresh, monkeypatch):
    """A call whose candidates lack the next scheduled route takes the next one it has; the passed-over call is not
    made up, and the rotation's end keeps the best of what was timed."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 1)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 1)
    log: list = []
    seconds = {"phase": "t", "t": 0.001}
    candidates = {name: sleeper(log, name, seconds) for name in ("compose", "fused")}
    routes.run(key(), candidates)
    first = routes.rotating(key(), candidates)
    assert first in candidates and routes.rotating(key(), {"gemv"}) is None
    other = ({"compose", "fused"} - {first}).pop()
    log.clear()
    assert routes.run(key(), {other: candidates[other]}) == other
    assert log == [other]
    (row,) = routes.routes()
    assert row["source"] == "measured in calls" and row["route"] == other and set(row["timings_ms"]) == {other}


def test_a_route_that_fails_in_a_rotation_call_leaves_it_and_the_call_takes_the_first_choice(fresh, monkeypatch):
    """A route that ran in the first measurement but raises in a real call: that call returns the first choice's
    result, the route is timed no more and is named in the confirmed choice's note."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 1)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 3)
    state = {"broken": False}

    def compose():
        time.sleep(0.004)
        return "compose"

    def fused():
        if state["broken"]:
            raise RuntimeError("lost its kernel")
        time.sleep(0.005)
        return "fused"

    candidates = {"compose": compose, "fused": fused}
    assert routes.run(key(), candidates) == "compose"
    state["broken"] = True
    results = [routes.run(key(), candidates) for _ in range(2 * routes.CALL_ROUNDS)]
    assert set(results) == {"compose"}
    (row,) = routes.routes()
    assert row["source"] == "measured in calls" and row["route"] == "compose"
    assert set(row["timings_ms"]) == {"compose"} and "fused: RuntimeError: lost its kernel" in row["note"]


def test_an_in_place_op_updates_its_target_once_per_call_through_the_rotation(fresh, monkeypatch):
    """``run_in_place`` offers the rotation's route alone on the real target: no copy, one update per call."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 2)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 2)
    target = torch.zeros(3)
    updaters = {name: (lambda t, name=name: (t.add_(1.0), name)[1]) for name in ("compose", "fused")}
    routes.run_in_place(key(), updaters, target)
    assert target.tolist() == [0.0] * 3, "the measurement updates copies"
    calls = 0
    while routes.routes()[0]["source"] != "measured in calls":
        routes.run_in_place(key(), updaters, target)
        calls += 1
        assert target.tolist() == [float(calls)] * 3
    # one call more than the rotation's when the first due call counted the last of the first choice's calls
    rotated = len(routes.routes()[0]["timings_ms"]) * routes.CALL_ROUNDS
    assert rotated <= calls <= rotated + 1


def test_deterministic_algorithms_keep_the_first_choice(fresh, monkeypatch):
    """Under ``torch.use_deterministic_algorithms`` no rotation runs: the due call keeps the first choice for good."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 2)
    log: list = []
    seconds = {"phase": "t", "t": 0.001}
    candidates = {name: sleeper(log, name, seconds) for name in ("compose", "fused")}
    chosen = routes.run(key(), candidates)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        log.clear()
        assert routes.rotating(key(), candidates) is None, "the due call takes no route in turn"
        results = [routes.run(key(), candidates) for _ in range(6)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert results == [chosen] * 6 and log == [chosen] * 6
    (row,) = routes.routes()
    assert row["source"] == "measured once" and row["route"] == chosen
    assert json.loads(fresh.read_text())["machines"][routes.machine_fingerprint("cpu")][key().as_string()]


def test_unconfirmed_counts_the_calls_left_and_the_bench_warms_up_through_them(fresh, monkeypatch):
    """``unconfirmed`` falls by one per call of a key awaiting confirmation, to 0 when the choice is final; the
    bench's warm-up runs rounds until it stops falling (a key no round calls does not keep it going)."""
    from fastpeft.bench.timing import warm_until_routes_confirmed

    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 3)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 2)
    log: list = []
    seconds = {"phase": "t", "t": 0.0005}
    candidates = {name: sleeper(log, name, seconds) for name in ("compose", "fused")}
    assert routes.unconfirmed() == 0
    routes.run(key(), candidates)
    close = len(routes.routes()[0]["timings_ms"])  # both within ROTATE_WITHIN of each other here
    left = [routes.unconfirmed()]
    assert left[0] == 2 + routes.CALL_ROUNDS * close, "two calls of the first choice, then the rotation"
    while routes.routes()[0]["source"] == "measured":
        routes.run(key(), candidates)
        left.append(routes.unconfirmed())
    assert left == list(range(left[0], -1, -1))
    routes.run(key(m=1), candidates)  # a second key, never called again: the warm-up stops after one idle round
    stale = routes.unconfirmed()
    assert stale > 0
    assert warm_until_routes_confirmed(lambda: None) == 1 and routes.unconfirmed() == stale
    rounds = warm_until_routes_confirmed(lambda: routes.run(key(m=1), candidates))
    assert routes.unconfirmed() == 0 and rounds == stale
    assert {row["source"] for row in routes.routes()} == {"measured in calls"}


def test_take_serves_a_settled_route_and_counts_the_call_toward_confirming_it(fresh, monkeypatch):
    """``take`` is ``run`` without the candidates for a call whose route is already decided: it names the pinned or
    chosen route and counts the call as ``run`` does, so the rotation that confirms the choice still comes on time;
    it names none where ``run`` has to decide (nothing chosen, an ineligible pin or choice, a call of the rotation)."""
    monkeypatch.setattr(routes, "CONFIRM_AFTER_CALLS", 4)
    monkeypatch.setattr(routes, "CALL_ROUNDS", 2)
    names = {"compose", "fused"}
    assert routes.take(key(), names) is None
    log: list = []
    seconds = {"phase": "t", "t": 0.001}
    candidates = {name: sleeper(log, name, seconds) for name in sorted(names)}
    chosen = routes.run(key(), candidates)
    assert routes.take(key(), {"gemv"}) is None, "the choice cannot serve this call"
    taken = [routes.take(key(), names) for _ in range(2)] + [routes.run(key(), candidates)]
    assert taken == [chosen] * 3 and routes.last_route("lora_forward") == chosen
    assert routes.take(key(), names) is None, "calls 1-3 were counted alike: the 4th times a route in turn"
    while routes.routes()[0]["source"] == "measured":
        assert routes.take(key(), names) is None
        routes.run(key(), candidates)
    assert routes.take(key(), names) == routes.routes()[0]["route"]
    routes.set_route("lora_forward", "gemv")
    assert routes.take(key(), {"compose", "gemv"}) == "gemv" and routes.last_route("lora_forward") == "gemv"
    assert routes.take(key(), names) is None, "a pin outside the names may serve among the op's other routes"


def test_fingerprint_names_the_build_of_the_compiled_kernels(monkeypatch):
    """Choices timed with one build of the extension are not reused by another build of the same version."""
    first = routes.machine_fingerprint("cpu")
    assert "|build=" in first
    monkeypatch.setattr(routes, "_build_stamp", lambda: "_C:other")
    assert routes.machine_fingerprint("cpu") != first


def test_a_far_slower_candidate_is_timed_once(fresh):
    """After the first timed round a candidate over ``PRUNE_FACTOR`` times the fastest (and ``PRUNE_MIN_S`` longer)
    runs no more; its one sample is its timing, and the fast candidates are timed every round."""
    import time

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.01)
        return "slow"

    candidates = {"compose": lambda: calls.append("compose") or "compose", "fused": slow}
    assert routes.run(key(), candidates) == "compose"
    assert calls.count("slow") == 2, "the warm-up and the first round"
    assert calls.count("compose") == 1 + routes.TIMED_ROUNDS
    timings = routes.routes()[0]["timings_ms"]
    assert timings["fused"] >= 10.0 > timings["compose"]
