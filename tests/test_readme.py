"""Every command in the README runs (the first block, `make demo` / `make test`, is CI itself).

Placeholders are replaced by real local paths: /path/to/LaMP_2M -> an official-shape fixture,
/path/to/Llama-2-7b-hf -> a micro Llama checkpoint saved with save_pretrained (so the
real-checkpoint path, LoRA task adaptation then merge, is what runs)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks and "make demo" in blocks[0] and "make test" in blocks[0]
    cmds = []
    for block in blocks[1:]:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    lines = [ln.split("#")[0].strip() for ln in first.splitlines() if ln.strip()]
    assert lines == ["make demo", "make test"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from oppu.model.base import build_tiny_base
    d = tmp_path_factory.mktemp("ckpt") / "Llama-tiny"
    build_tiny_base(["description: a film tag: comedy", "article: x headline: y"] * 40, d, preset="micro")
    return d


def test_every_readme_command_runs(tmp_path, checkpoint):
    cmds = readme_commands()
    assert any(c.startswith("oppu run") for c in cmds)
    env = {**os.environ, "OPPU_CACHE": str(tmp_path / "cache")}
    shared = Path(os.environ.get("OPPU_CACHE", "")) / "models"
    if os.environ.get("OPPU_CACHE") and any("smollm2" in c for c in cmds):
        from oppu.model.base import resolve_base_path
        resolve_base_path("smollm2", os.environ["OPPU_CACHE"])  # once per cache, shared with test_smollm2
    if os.environ.get("OPPU_CACHE") and shared.is_dir():  # a materialized SmolLM2 is reused, bases are not
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "models").symlink_to(shared)
    oppu = [sys.executable, "-m", "oppu.cli"]
    for cmd in cmds:
        cmd = cmd.replace("/path/to/LaMP_2M", str(FIX / "lamp_user_based" / "LaMP_2M"))
        cmd = cmd.replace("/path/to/Llama-2-7b-hf", str(checkpoint))
        argv = shlex.split(cmd)
        assert argv[0] == "oppu", cmd
        if argv[1] == "run":  # keep the real-checkpoint run small: the fixture has 6 dev users
            argv += ["--test-users", "2", "--base-epochs", "1", "--user-epochs", "1"]
            if "smollm2" in argv:  # 135M parameters on 2 cores: 4 items per user, rule-based profiles (~70 s less)
                argv += ["--max-history-items", "4", "--profile", "statistical"]
        if argv[1] == "experiment":  # the same command, at micro size
            argv += ["--test-users", "3", "--other-users", "8", "--seeds", "1", "--base-epochs", "1",
                     "--user-epochs", "1"] + ([] if "--base" in argv else ["--base", "tiny:micro"])
            argv += ["--levels", "1,2"] if argv[2] == "cold-start" else []
        r = subprocess.run(oppu + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        if argv[1] == "run":
            out = tmp_path / argv[argv.index("--out") + 1]
            info = json.loads((out / "run.json").read_text())
            assert info["base"]["task_adaptation"] == "lora-merged"
            assert (out / "report.md").exists() and set(info["config"]["methods"]) <= set(json.loads(
                (out / "metrics.json").read_text()))
            if "smollm2" in argv:
                assert info["base"]["prompt_style"] == "chat" and len(info["base"]["origin"]["sha256"]) == 64
        if argv[1] == "experiment":
            out = tmp_path / argv[argv.index("--out") + 1]
            res = json.loads((out / "results.json").read_text())
            assert res["experiment"] == argv[2] and res["rows"] and (out / "report.md").exists()
        if argv[1] == "score":
            assert json.loads(r.stdout) == {"MAE": 0.0, "RMSE": 0.0}
