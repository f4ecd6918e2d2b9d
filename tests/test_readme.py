"""The README's offline quick start runs as written: trained, saved in PEFT's format and reloaded by plain PEFT."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start_block() -> str:
    text = README.read_text()
    section = text.split("## Quick start (offline)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's offline quick start has no python block"
    return match.group(1)


def test_offline_quick_start_runs_as_written(tmp_path):
    code = _quick_start_block()
    assert "from_pretrained(\"" not in code.split("PeftModel.from_pretrained")[0], "the quick start must not download"
    env = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "adapter layers run fused" in out and "step 4: loss" in out, out[-2000:]
    assert "largest logit difference after reloading in plain PEFT" in out
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()


def test_the_map_of_the_code_names_every_module():
    """The README's "How it is built" table names every module of the package and every kernel file, so a newcomer
    finds each file there; a module added without a line fails here."""
    root = README.parent
    section = README.read_text().split("## How it is built", 1)[1].split("\n## ", 1)[0]
    missing = []
    for folder in ("fastpeft", "fastpeft/backends", "kernels"):
        for path in sorted((root / folder).glob("*.py")):
            if path.name == "__init__.py" and folder != "fastpeft":
                continue
            if f"`{folder}/{path.name}`" not in section and f"`{path.name}`" not in section and \
                    f"{path.stem}.py" not in section:
                missing.append(f"{folder}/{path.name}")
    for folder in ("fastpeft/bench/", "csrc/cpu/", "csrc/cuda/", "benchmarks/", "tests/", "docs/"):
        if f"`{folder}`" not in section:
            missing.append(folder)
    assert not missing, f"the README's map of the code does not name: {missing}"
