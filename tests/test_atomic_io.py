"""Nothing fastpeft writes is ever left half-written: ``fastpeft.save_pretrained`` (both forms, one adapter and two),
the write helpers in ``fastpeft._atomic`` and the benchmark's outputs. A crash is simulated at each write (the write
stops a third of the way and raises, or the process dies there); the previous adapter must stay byte for byte and
load with PEFT and with fastpeft. The route cache's tests are at the end of ``test_routes.py``."""

from __future__ import annotations

import errno
import multiprocessing
import os
import warnings

import peft.config
import peft.peft_model
import pytest
import safetensors.torch
import torch
from model_helpers import MLP
from peft import LoraConfig, PeftModel

import fastpeft
from fastpeft import _atomic
from fastpeft.bench import report

SECOND = "second"
FORMS = {"all adapters": None, "named": "default"}


def _model(seed: int, two: bool = False) -> PeftModel:
    torch.manual_seed(seed)
    model = fastpeft.patch(MLP(), r=2, target_modules=["up", "down"], init_lora_weights=False)
    if two:
        model.add_adapter(SECOND, LoraConfig(r=3, target_modules=["up"], init_lora_weights=False))
    return model


def _adapter_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _train_further(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.5)


def _snapshot(root) -> dict:
    """Every file under ``root``: relative path -> bytes."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, root)] = handle.read()
    return files


def _assert_loads(path, want: dict, two: bool) -> None:
    """The adapter(s) at ``path`` load with PEFT and with fastpeft, holding exactly the tensors of ``want``."""
    with_peft = PeftModel.from_pretrained(MLP(), str(path))
    with_fastpeft = fastpeft.load_adapter(MLP(), str(path))
    if two:
        with_peft.load_adapter(os.path.join(path, SECOND), adapter_name=SECOND)
        fastpeft.load_adapter(with_fastpeft, os.path.join(path, SECOND), adapter_name=SECOND)
    for loaded in (with_peft, with_fastpeft):
        got = _adapter_state(loaded)
        expected = {k: v for k, v in want.items() if two or f".{SECOND}." not in k}
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)


def _cut_to_a_third(path) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 3])


def _crash_in(monkeypatch, what: str, folder: str = "", die=None) -> None:
    """From now on, writing ``what`` ("weights" or "config") into a folder named ``folder`` (any folder when empty)
    writes a third of the file and then raises, or calls ``die`` (a process that dies there)."""

    def crash(path):
        _cut_to_a_third(path)
        if die is not None:
            die()
        raise OSError(errno.ENOSPC, "simulated crash: no space left while writing", path)

    def wanted(directory):
        return not folder or os.path.basename(os.path.normpath(directory)) == folder

    if what == "weights":
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            if wanted(os.path.dirname(filename)):
                crash(filename)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    else:
        real_save_config = peft.config.PeftConfigMixin.save_pretrained

        def save_config(self, save_directory, **kwargs):
            real_save_config(self, save_directory, **kwargs)
            if wanted(save_directory):
                crash(os.path.join(save_directory, "adapter_config.json"))

        monkeypatch.setattr(peft.config.PeftConfigMixin, "save_pretrained", save_config)


def _saved_then_trained(tmp_path, form, two):
    """An adapter saved at ``tmp_path/adapter``, then the model trained further: (model, path, what the file holds,
    the files, the entries beside it)."""
    path = tmp_path / "adapter"
    model = _model(1, two)
    fastpeft.save_pretrained(model, str(path), adapter_name=form)
    saved = _adapter_state(model)
    _train_further(model)
    return model, path, saved, _snapshot(path), sorted(os.listdir(tmp_path))


CRASHES = [(form, two, what, "") for form, two in [(None, False), ("default", False), (None, True)]
           for what in ("weights", "config", "swap")]
CRASHES += [(None, True, "weights", SECOND), (None, True, "config", SECOND)]


@pytest.mark.parametrize("form, two, what, folder", CRASHES,
                         ids=[f"{'all' if f is None else f}-{'two' if t else 'one'}-{w}{'-in-' + d if d else ''}"
                              for f, t, w, d in CRASHES])
def test_crash_during_save_keeps_the_previous_adapter(tmp_path, monkeypatch, form, two, what, folder):
    model, path, saved, files, beside = _saved_then_trained(tmp_path, form, two)
    if what == "swap":
        def refuse(a, b):
            raise OSError(errno.EIO, "simulated crash while swapping", b)

        monkeypatch.setattr(_atomic, "_exchange", refuse)
    else:
        _crash_in(monkeypatch, what, folder)
    with pytest.raises(OSError, match="simulated crash"):
        fastpeft.save_pretrained(model, str(path), adapter_name=form)
    monkeypatch.undo()
    assert _snapshot(path) == files, "the previous adapter was changed"
    assert sorted(os.listdir(tmp_path)) == beside, "a failed save left temporary files behind"
    _assert_loads(path, saved, two and form is None)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    _crash_in(monkeypatch, "weights")
    with pytest.raises(OSError, match="simulated crash"):
        fastpeft.save_pretrained(_model(1), str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


def _die():
    os._exit(3)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_process_killed_mid_save_keeps_the_previous_adapter(tmp_path, form):
    model, path, saved, files, _ = _saved_then_trained(tmp_path, form, two=False)

    def save_and_die():
        with pytest.MonkeyPatch.context() as mp:
            _crash_in(mp, "weights", die=_die)
            fastpeft.save_pretrained(model, str(path), adapter_name=form)

    child = multiprocessing.get_context("fork").Process(target=save_and_die)
    child.start()
    child.join(60)
    assert child.exitcode == 3, f"the child did not die mid-save (exit code {child.exitcode})"
    assert _snapshot(path) == files, "the previous adapter was changed"
    _assert_loads(path, saved, two=False)
    fastpeft.save_pretrained(model, str(path), adapter_name=form)  # a later save is not blocked by the leftovers
    _assert_loads(path, _adapter_state(model), two=False)


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_save_replaces_the_adapter_and_keeps_the_users_files(tmp_path, form):
    """The new adapter replaces the old; files the save does not write stay, as with PEFT's in-place save (which
    also updates an existing README model card)."""
    user_files = {"README.md": b"# my adapter\n\nNotes of my own.\n", "tokenizer.json": b'{"vocab": {}}',
                  os.path.join("notes", "run.txt"): b"lr 1e-4", os.path.join(SECOND, "extra.txt"): b"kept"}
    atomic, in_place = tmp_path / "atomic", tmp_path / "in-place"
    model = _model(1, two=True)
    for root in (atomic, in_place):
        for rel, data in user_files.items():
            os.makedirs(os.path.dirname(root / rel), exist_ok=True)
            (root / rel).write_bytes(data)
    fastpeft.save_pretrained(model, str(atomic), adapter_name=form)
    _train_further(model)
    fastpeft.save_pretrained(model, str(atomic), adapter_name=form)
    if form is None:
        model.save_pretrained(str(in_place))
        assert _snapshot(atomic) == _snapshot(in_place), "the directory differs from PEFT's in-place save"
        assert b"Notes of my own." in (atomic / "README.md").read_bytes()
    else:
        assert {k: v for k, v in _snapshot(atomic).items() if k in user_files} == user_files
    _assert_loads(atomic, _adapter_state(model), two=form is None)
    assert sorted(os.listdir(tmp_path)) == ["atomic", "in-place"]


def test_save_into_a_file_is_refused(tmp_path):
    (tmp_path / "adapter").write_text("not a directory")
    for form in FORMS.values():
        with pytest.raises(ValueError, match="is a file"):
            fastpeft.save_pretrained(_model(1), str(tmp_path / "adapter"), adapter_name=form)


def test_save_into_the_working_directory(tmp_path, monkeypatch):
    path = tmp_path / "adapter"
    model = _model(1)
    fastpeft.save_pretrained(model, str(path))
    monkeypatch.chdir(path)
    _train_further(model)
    fastpeft.save_pretrained(model, ".")
    assert os.path.samefile(os.getcwd(), path), "the process was left in the deleted old directory"
    _assert_loads(".", _adapter_state(model), two=False)


def test_save_without_an_atomic_exchange(tmp_path, monkeypatch):
    """Where the system cannot exchange two directories, the old one is renamed aside and the new one in; if the
    second rename fails the old one is put back."""
    model, path, saved, files, beside = _saved_then_trained(tmp_path, None, two=True)
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename
    renames = []

    def rename(src, dst):
        renames.append(os.path.basename(src))
        if len(renames) == 2:  # the first moves the old directory aside, the second would move the new one in
            raise OSError(errno.EIO, "simulated crash in the second rename", dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        fastpeft.save_pretrained(model, str(path))
    monkeypatch.setattr(os, "rename", real_rename)
    assert _snapshot(path) == files and sorted(os.listdir(tmp_path)) == beside
    fastpeft.save_pretrained(model, str(path))
    _assert_loads(path, _adapter_state(model), two=True)
    assert sorted(os.listdir(tmp_path)) == beside


@pytest.mark.parametrize("where", ["mount point", "read-only parent"])
def test_directory_that_cannot_be_swapped_is_updated_file_by_file(tmp_path, monkeypatch, where):
    model, path, _, files, beside = _saved_then_trained(tmp_path, None, two=True)
    (path / "tokenizer.json").write_text("{}")
    if where == "mount point":
        def busy(new, target):
            raise OSError(errno.EBUSY, "Device or resource busy", target)

        monkeypatch.setattr(_atomic, "_swap_into_place", busy)
    else:
        real_mkdir = os.mkdir

        def mkdir(p, *args, **kwargs):
            if os.path.dirname(os.path.abspath(p)) == str(tmp_path):
                raise PermissionError(errno.EACCES, "Permission denied", p)
            real_mkdir(p, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.warns(UserWarning, match="cannot be replaced as a whole"):
        fastpeft.save_pretrained(model, str(path))
    monkeypatch.undo()
    _assert_loads(path, _adapter_state(model), two=True)
    assert set(_snapshot(path)) == set(files) | {"tokenizer.json"}, "leftovers inside the adapter directory"
    assert sorted(os.listdir(tmp_path)) == beside


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_saving_to_one_path_leave_one_whole_adapter(tmp_path):
    """Each save carries the user's files over from the directory it replaces; a second writer must not delete that
    directory under it."""
    path = str(tmp_path / "adapter")
    models = [_model(1), _model(2)]
    fastpeft.save_pretrained(models[0], path)
    os.mkdir(os.path.join(path, "notes"))
    user_files = {os.path.join("notes", f"{i}.txt"): str(i).encode() for i in range(60)}
    for rel, data in user_files.items():
        with open(os.path.join(path, rel), "wb") as handle:
            handle.write(data)
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)

    def save_repeatedly(model):
        start.wait()
        for _ in range(10):
            fastpeft.save_pretrained(model, path)

    children = [context.Process(target=save_repeatedly, args=(m,)) for m in models]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    loaded = _adapter_state(fastpeft.load_adapter(MLP(), path))
    assert any(all(torch.equal(loaded[k], _adapter_state(m)[k]) for k in loaded) for m in models)
    assert {k: v for k, v in _snapshot(path).items() if k in user_files} == user_files
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# --------------------------------------------------------------------------------------------- the file helper
def test_atomic_file_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with _atomic.atomic_file(str(target)) as handle:
            handle.write("new, but only a part")
            raise RuntimeError("midway")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with _atomic.atomic_file(str(target), "wb") as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.txt"]
    with pytest.raises(ValueError, match="whole files"):
        with _atomic.atomic_file(str(target), "a"):
            pass


def test_atomic_file_permissions_follow_the_umask(tmp_path):
    with open(tmp_path / "plain", "w"):
        pass
    with _atomic.atomic_file(str(tmp_path / "atomic")):
        pass
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(tmp_path / "plain").st_mode


# ----------------------------------------------------------------------------------------- benchmark outputs
def _rows():
    rows = []
    for provider, ms in (("base", 1.0), ("peft", 3.0), ("fastpeft", 1.5)):
        for m in (1, 16):
            rows.append(dict(level="layer", kind="lora", shape="7b-qkvo", K=64, N=64, M=m, r=4, dtype="fp32",
                             dropout=0.0, mode="fwd", provider=provider, backend="cpu", fused=True, metric="time",
                             value=ms * m, unit="ms", q25=ms, q75=ms, reps=3))
    return rows


class _FailsWhenWritten:
    def __str__(self):
        raise OSError(errno.ENOSPC, "simulated crash: no space left")


def test_bench_csv_keeps_its_rows_when_a_write_fails(tmp_path):
    path = str(tmp_path / "results.csv")
    writer = report.CsvWriter(path, {"machine": "test"})
    writer.write(_rows()[:3])
    before = (tmp_path / "results.csv").read_bytes()
    with pytest.raises(OSError, match="simulated crash"):
        writer.write([_rows()[3], dict(_rows()[4], value=_FailsWhenWritten())])
    assert (tmp_path / "results.csv").read_bytes() == before
    assert [r["value"] for r in report.read_csv(path)] == ["1.0", "16.0", "3.0"]
    assert os.listdir(tmp_path) == ["results.csv"]


def test_bench_outputs_are_whole_files(tmp_path):
    from fastpeft.bench.__main__ import main

    writer = report.CsvWriter(str(tmp_path / "results.csv"), {"machine": "test", "device_name": "cpu"})
    writer.write(_rows())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib's own deprecations
        assert main(["--replot", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["overhead_fp32.png", "results.csv", "results.md", "speedup_fp32.png"]
    for name in ("overhead_fp32.png", "speedup_fp32.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "fastpeft benchmark results" in (tmp_path / "results.md").read_text()
