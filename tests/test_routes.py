"""The route table (``fastpeft.routing``): measured choice, pins, the cache file, and the per-op tables.

That each route computes the same thing is tested op by op in ``test_cpu_backend.py`` / ``test_cpu_quant.py``
(every route pinned in turn against the reference); here: how a route is chosen and remembered.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from fastpeft import routing as routes


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty route table and cache file for one test; pins removed afterwards."""
    path = tmp_path / "routes.json"
    monkeypatch.setenv("FASTPEFT_ROUTE_CACHE", str(path))
    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    routes.clear_choices()
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


def test_route_table_names_every_route_with_its_limits():
    table = routes.route_table()
    assert set(table["routes"]) == {"lora_forward", "lora_backward", "ia3_forward", "ia3_backward"}
    assert "compose" in table["routes"]["lora_forward"] and "bnb_native" in table["limits"]


def test_candidates_are_timed_in_interleaved_rounds(fresh):
    """One warm-up run of each candidate, then rounds that run every candidate once, so a change in the machine's
    load during measurement hits every route alike."""
    calls = []
    routes.run(key(), {"compose": lambda: calls.append("compose") or 1, "fused": lambda: calls.append("fused") or 2})
    assert len(calls) == 2 * (1 + routes.TIMED_ROUNDS)
    assert calls == ["compose", "fused"] * (1 + routes.TIMED_ROUNDS)
    (row,) = routes.routes()
    assert set(row["timings_ms"]) == {"compose", "fused"}


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
