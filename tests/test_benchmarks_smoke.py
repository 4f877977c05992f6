"""Every benchmark script runs at a tiny size and ends with one JSON object with its required keys.

One subprocess runs each script in turn as __main__ (runpy, its own argv, its stdout captured), so
torch/transformers/peft are imported once rather than three times: on 2 shared cores that import
is most of a tiny run's cost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "train_users": ["--users", "4", "--preset", "micro", "--epochs", "1", "--min-history", "6", "--max-history", "10",
                    "--peak-size", "256"],
    "serve_users": ["--users", "4", "--preset", "micro", "--max-new-tokens", "4", "--repeats", "1"],
    "adapter_io": ["--users", "4", "--preset", "micro", "--epochs", "1", "--base-epochs", "0", "--other-users", "4"],
}
MACHINE = {"cpu_model", "cpu_cores", "torch_threads", "torch", "cuda_device", "device"}


DRIVER = """
import contextlib, io, json, runpy, sys, traceback
root, runs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root + "/benchmarks")
out = {}
for name, args in runs.items():
    buf = io.StringIO()
    sys.argv = [root + "/benchmarks/" + name + ".py", *args]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(sys.argv[0], run_name="__main__")
        out[name] = {"rc": 0, "stdout": buf.getvalue()}
    except BaseException:
        out[name] = {"rc": 1, "stdout": buf.getvalue(), "error": traceback.format_exc()[-3000:]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), json.dumps(TINY)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _result(runs, name: str) -> dict:
    r = runs[name]
    assert r["rc"] == 0, r["error"]
    res = json.loads(r["stdout"].strip().splitlines()[-1])  # the last stdout line
    assert res["benchmark"] == name and MACHINE <= set(res["machine"])
    return res


def test_train_users(runs):
    res = _result(runs, "train_users")
    assert res["users"] == 4
    for arm in ("batched", "sequential_peft"):
        assert {"users_per_hour", "final_loss", "flops_per_s", "mfu", "wall_s"} <= set(res[arm])
        assert res[arm]["users_per_hour"] > 0 and 0 < res[arm]["mfu"]
    assert {"ratio_vs_sequential_peft", "final_loss_rel_diff", "peak_matmul_flops", "flops_formula"} <= set(res)
    # same init, data order and optimizer in both arms: the same training, to float tolerance
    assert res["final_loss_rel_diff"] < 1e-3


def test_serve_users(runs):
    res = _result(runs, "serve_users")
    assert set(res["results"]) == {"lora", "ia3", "prompt_tuning"}
    for kind, r in res["results"].items():
        for arm in ("mixed", "adapter_swap"):
            assert {"tokens_per_s", "p50_latency_ms", "p99_latency_ms", "wall_s"} <= set(r[arm])
            assert r[arm]["p50_latency_ms"] <= r[arm]["p99_latency_ms"]
        assert r["ratio_vs_adapter_swap"] > 0
        assert r["outputs_identical"] == 1.0, kind  # a mixed batch gives each user their own output
    assert "peft_adapter_names" in res["results"]["lora"]


def test_adapter_io(runs):
    res = _result(runs, "adapter_io")
    for kind, b in res["bytes_per_user"].items():
        assert 0 < b["bf16_bytes"] < b["fp32_bytes"], kind
    assert {"fp32", "bf16"} <= set(res["cold_load_ms"]) and "median_ms" in res["cache_hit_ms"]
    assert res["cache"]["hits"] > 0 and res["cache"]["bytes"] <= res["cache"]["max_bytes"]
    s = res["bf16_score"]
    assert {"outputs_identical", "max_abs_logit_diff", "metric"} <= set(s) and 0 <= s["outputs_identical"] <= 1
