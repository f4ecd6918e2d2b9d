"""``make demo``'s script at a tiny size: every row has its spread beside its median, and a spread that says the
machine was busy is flagged instead of printed as a clean ratio."""

from __future__ import annotations

from fastpeft import demo

TINY = ["--steps", "4", "--warmup", "1", "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "64",
        "--seq-len", "8", "--batch", "1", "--threads", "1"]


def test_demo_rows_carry_their_spread(capsys):
    rows = demo.main(TINY)
    assert [r["name"] for r in rows] == ["base (frozen)", "peft", "fastpeft"]
    for row in rows:
        assert row["q25_ms"] <= row["step_ms"] <= row["q75_ms"], row
    out = capsys.readouterr().out
    assert "q25-q75 ms" in out and "fastpeft step is" in out


def test_busy_machine_is_flagged(capsys, monkeypatch):
    monkeypatch.setattr(demo.bench_timing, "UNSTEADY_SPREAD", -1.0)  # every spread counts as too wide
    demo.main(TINY)
    assert "warning: the step times of base (frozen), peft, fastpeft spread" in capsys.readouterr().out
