"""pytest set-up for the suite: the Triton mode, thread count, route cache, the ``final_routes`` fixture and the
``gpu``/``dist`` markers. The comparison helpers are in ``checks.py``, the tiny models in ``model_helpers.py``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Subprocesses the tests start (python -c / -m from the repo root) must not find the repo's kernels/ folder as a
# top-level ``kernels`` package: that name belongs to Hugging Face's package, which bitsandbytes imports.
os.environ.setdefault("PYTHONSAFEPATH", "1")
# Triton decides at import whether @jit functions (its own tl.zeros, tl.cdiv and tl.rand included) run in the
# interpreter, and peft/bitsandbytes import it early. So the whole session picks the mode here, before anything
# imports Triton: the interpreter when there is no CUDA device. Ahead-of-time compile tests start their own
# processes in compile mode.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "conftest must run before triton is imported"
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Measured route choices go to a file of this test session, never to the user's cache (and never read from it: a
# choice made outside the tests must not decide which route the tests run).
if "FASTPEFT_ROUTE_CACHE" not in os.environ:
    import tempfile

    os.environ["FASTPEFT_ROUTE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="fastpeft-routes-"), "routes.json")


@pytest.fixture(scope="session")
def load_benchmark_script():
    """``load(name)``: ``benchmarks/<name>.py`` as a module, loaded by path, so the repository root stays off
    ``sys.path`` (its ``kernels/`` must never be importable as a top-level ``kernels``)."""
    import importlib.util

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def final_routes(monkeypatch):
    """First measurements are final, so calls settle at once; no pins, and none left behind."""
    import fastpeft
    from fastpeft import routing

    monkeypatch.delenv("FASTPEFT_ROUTE", raising=False)
    monkeypatch.setattr(routing, "CONFIRM_AFTER_CALLS", 0)
    routing.clear_choices()
    yield
    routing.set_route(None, None)
    fastpeft.set_backend(None)
    routing.clear_choices()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; collected everywhere, skipped without one")
    config.addinivalue_line("markers", "dist: multi-process (gloo) distributed tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
