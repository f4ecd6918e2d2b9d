"""The repo's ``kernels/`` folder is ``fastpeft.kernels`` and never the top-level ``kernels`` package.

Hugging Face owns the name ``kernels`` (transformers and bitsandbytes import ``kernels.get_kernel``); with the repo
root on ``sys.path`` the repo's folder would shadow it. Checked in this process and in a child started from the repo
root the way the tests start theirs.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIND_KERNELS = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else 'absent')"


def _is_repo_kernels(origin: str | None) -> bool:
    return origin not in (None, "absent") and Path(origin).resolve().is_relative_to(REPO / "kernels")


def test_top_level_kernels_is_not_the_repo_folder():
    spec = importlib.util.find_spec("kernels")
    assert not _is_repo_kernels(spec.origin if spec else None), f"`import kernels` finds {spec.origin}"
    assert str(REPO) not in [str(Path(p).resolve()) for p in sys.path if p], "the repo root is on sys.path"


def test_child_process_from_repo_root_does_not_see_repo_kernels():
    out = subprocess.run([sys.executable, "-c", FIND_KERNELS], cwd=REPO, capture_output=True, text=True, check=True)
    assert not _is_repo_kernels(out.stdout.strip()), f"a child finds `kernels` at {out.stdout.strip()}"


def test_fastpeft_kernels_is_the_repo_folder():
    import fastpeft.kernels

    assert Path(fastpeft.kernels.__file__).resolve().parent == REPO / "kernels"


def test_version_and_lint_settings_live_in_one_place():
    """The version is written once (``fastpeft.__version__``, read by pyproject.toml) and what pip installed reports
    it; the lint rules are pyproject.toml's, with no second config file that ruff would prefer."""
    import importlib.metadata
    import re

    import fastpeft

    assert importlib.metadata.version("fastpeft") == fastpeft.__version__
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'version = {attr = "fastpeft.__version__"}' in pyproject
    assert re.search(r'select = \[[^\]]*"E"[^\]]*"F"[^\]]*"I"[^\]]*"B"[^\]]*"W"', pyproject)
    assert not re.search(r"\bversion\s*=", (REPO / "setup.py").read_text())
    assert not (REPO / "ruff.toml").exists() and not (REPO / ".ruff.toml").exists()


def test_comparison_helpers_have_one_home():
    """``tests/checks.py`` is the only definition of the comparison helpers, and no test imports ``conftest`` (pytest
    loads it itself; importing it runs its set-up a second time under another module name)."""
    import re

    for path in sorted((REPO / "tests").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"^(from conftest import|import conftest)", text, re.M), f"{path.name} imports conftest"
        if path.name != "checks.py":
            defined = re.findall(r"^def (rel_err|assert_close|assert_within_2x)\b", text, re.M)
            assert not defined, f"{path.name} defines its own {defined}"
