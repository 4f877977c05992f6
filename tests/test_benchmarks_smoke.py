"""Every benchmark script runs at a tiny size and ends with one JSON object with its required keys.

One subprocess runs each script in turn as __main__ (runpy, its own argv, its stdout captured), so
torch/transformers/peft are imported once rather than once per script: on 2 shared cores that
import is most of a tiny run's cost. (load_server starts its own `oppu serve` process.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--users", "4", "--preset", "micro", "--epochs", "1", "--min-history", "6", "--max-history", "10",
              "--peak-size", "256"]
RUNS = {  # run name -> (script, argv)
    "train_users": ("train_users", TINY_TRAIN),
    "train_users_loop": ("train_users", [*TINY_TRAIN, "--baseline", "loop"]),
    "serve_users": ("serve_users", ["--users", "4", "--preset", "micro", "--max-new-tokens", "4", "--repeats", "1"]),
    "adapter_io": ("adapter_io", ["--users", "4", "--preset", "micro", "--epochs", "1", "--base-epochs", "0",
                                  "--other-users", "4"]),
    "adapter_scale": ("adapter_scale", ["--base", "tiny:micro", "--users", "3,8", "--sample", "3"]),
    "load_server": ("load_server", ["--clients", "2", "--duration", "1", "--base", "tiny:micro", "--threads", "1",
                                    "--history", "4", "--user-epochs", "1", "--train-items", "6"]),
    "instant_serve": ("instant_serve", ["--base", "tiny:micro", "--base-epochs", "0", "--users", "2", "--items", "6",
                                        "--bank-users", "3", "--threads", "1"]),
    "tenants": ("tenants", ["--duration", "0.5", "--victim-clients", "1", "--flood", "2", "--big-history", "200",
                            "--train-items", "40", "--user-epochs", "1"]),
}
MACHINE = {"cpu_model", "cpu_cores", "torch_threads", "torch", "cuda_device", "device"}


DRIVER = """
import contextlib, io, json, runpy, sys, traceback
root, runs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root + "/benchmarks")
out = {}
for name, (script, args) in runs.items():
    buf = io.StringIO()
    sys.argv = [root + "/benchmarks/" + script + ".py", *args]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(sys.argv[0], run_name="__main__")
        out[name] = {"rc": 0, "stdout": buf.getvalue()}
    except BaseException:
        out[name] = {"rc": 1, "stdout": buf.getvalue(), "error": traceback.format_exc()[-3000:]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    from oppu.data.synth import synth_world
    world = tmp_path_factory.mktemp("lamp4")
    synth_world("LaMP_4", world, seed=1, test_users=2, other_users=4, min_history=6, max_history=8)
    runs = {**RUNS, "task_adapt_scale": ("task_adapt_scale", [
        "--data", str(world), "--resample", "20x6", "--arms", "uncapped,capped", "--capped-tokens", "2000",
        "--base", "tiny:micro", "--test-users", "2"])}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), json.dumps(runs)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _result(runs, name: str) -> dict:
    r = runs[name]
    assert r["rc"] == 0, r["error"]
    res = json.loads(r["stdout"].strip().splitlines()[-1])  # the last stdout line
    assert res["benchmark"] == (RUNS[name][0] if name in RUNS else name) and MACHINE <= set(res["machine"])
    return res


@pytest.mark.parametrize("name,baseline", [("train_users", "trainer"), ("train_users_loop", "loop")])
def test_train_users(runs, name, baseline):
    res = _result(runs, name)
    assert res["users"] == 4 and res["baseline"] == baseline
    for arm in ("batched", "sequential_peft"):
        r = res[arm]
        assert {"users_per_hour", "final_loss", "flops_per_s", "mfu", "mfu_6n", "wall_s"} <= set(r)
        # recomputed from the run's raw figures: users, tokens, wall time, the measured matmul peak
        rel = 0.01 + 0.006 / r["wall_s"]  # wall_s is printed to 0.01 s
        assert r["users_per_hour"] == pytest.approx(res["users"] * 3600 / r["wall_s"], rel=rel)
        assert r["mfu_4n"] == pytest.approx(4 * res["matmul_params"] * res["train_tokens"] / r["wall_s"]
                                            / res["peak_matmul_flops"], rel=rel, abs=2e-4)
        # mfu counts what a frozen base needs (forward + input gradients; the lm_head at targets only),
        # mfu_4n the same at every position, mfu_6n the usual 6N
        assert r["flops_per_s_6n"] == pytest.approx(1.5 * r["flops_per_s"], rel=1e-6)
        assert abs(r["mfu_4n"] - r["mfu_6n"] * 2 / 3) <= 1e-4
        tokens_per_epoch = res["train_tokens"] / res["epochs"]
        need = res["epochs"] * (4 * res["params_adapted_layers"] * tokens_per_epoch
                                + 4 * res["head_params"] * res["target_tokens_per_epoch"])
        assert res["params_below"] == 0 and not res["prefix_reused"]   # every layer adapted
        assert res["params_adapted_layers"] + res["head_params"] == res["matmul_params"]
        assert res["needed_flops"] == pytest.approx(need, rel=1e-9)
        assert r["mfu"] == r["mfu_needed"] == pytest.approx(need / r["wall_s"] / res["peak_matmul_flops"],
                                                            rel=rel, abs=2e-4)
        assert r["mfu"] < r["mfu_4n"]
    assert {"ratio_vs_sequential_peft", "final_loss_rel_diff", "peak_matmul_flops", "flops_formula"} <= set(res)
    assert res["flops_formula"].startswith("mfu = mfu_needed")
    # same init, data order and optimizer in both arms: the same training, to float tolerance
    assert res["final_loss_rel_diff"] < 1e-3


def test_serve_users(runs):
    res = _result(runs, "serve_users")
    assert set(res["results"]) == {"lora", "ia3", "prompt_tuning"}
    for kind, r in res["results"].items():
        for arm in ("mixed", "adapter_swap"):
            assert {"tokens_per_s", "p50_latency_ms", "p99_latency_ms", "wall_s"} <= set(r[arm])
            assert r[arm]["tokens_per_s"] == pytest.approx(r[arm]["generated_tokens"] / r[arm]["wall_s"],
                                                           rel=0.01 + 0.0006 / r[arm]["wall_s"])  # wall_s to 1e-4 s
        # one mixed batch answers every request at once; swapping answers them one after another
        assert r["mixed"]["p50_latency_ms"] == r["mixed"]["p99_latency_ms"]
        assert r["adapter_swap"]["p50_latency_ms"] < r["adapter_swap"]["p99_latency_ms"]
        assert r["ratio_vs_adapter_swap"] == pytest.approx(r["mixed"]["tokens_per_s"] / r["adapter_swap"]["tokens_per_s"],
                                                           rel=0.02)
        assert r["outputs_identical"] == 1.0, kind  # a mixed batch gives each user their own output
    assert "peft_adapter_names" in res["results"]["lora"]


def test_adapter_io(runs):
    res = _result(runs, "adapter_io")
    for kind, b in res["bytes_per_user"].items():
        assert 0 < b["bf16_bytes"] < b["fp32_bytes"], kind
    assert {"fp32", "bf16"} <= set(res["cold_load_ms"]) and "median_ms" in res["cache_hit_ms"]
    assert "median_ms" in res["slots_ensure_ms"]
    assert res["cache"]["hits"] > 0 and res["cache"]["bytes"] <= res["cache"]["max_bytes"]
    s = res["bf16_score"]
    assert {"outputs_identical", "max_abs_logit_diff", "metric"} <= set(s) and 0 <= s["outputs_identical"] <= 1


def test_adapter_scale(runs):
    res = _result(runs, "adapter_scale")
    assert [r["users"] for r in res["by_store_size"]] == [3, 8] and res["by_store_size"][0]["p99_ratio_vs_smallest"] == 1
    for r in res["by_store_size"]:
        assert 0 < r["cold_load_ms"]["p50_ms"] <= r["cold_load_ms"]["p99_ms"] and r["cache_hit_ms"]["p50_ms"] > 0
    for kind, b in res["bytes_per_user"].items():
        assert 0 < b["bf16_bytes"] < b["fp32_bytes"], kind


def test_load_server(runs):
    res = _result(runs, "load_server")
    assert res["clients"] == 2 and res["errors"] == 0 and res["requests"] > 0
    assert {"p50", "p90", "p99"} <= set(res["latency_ms"]) and res["latency_ms"]["p50"] <= res["latency_ms"]["p99"]
    assert res["throughput_rps"] > 0 and res["mean_batch_rows"] >= 1
    assert res["setup"]["training_neighbour"]["status_at_end"] in ("queued", "running", "done")


def test_tenants(runs):
    res = _result(runs, "tenants")
    assert set(res["arms"]) == {"export", "history", "training", "delete"} and res["alone"]["rps"] > 0
    for arm in res["arms"].values():
        assert {"rps", "p50_ms", "p99_ms", "rate_ratio", "p99_ratio", "ok", "victim_codes", "neighbour_codes"} <= set(arm)
    assert "429" in res["arms"]["export"]["neighbour_codes"]  # the flood is refused
    assert "429" not in res["arms"]["export"]["victim_codes"]  # the victim is not


def test_instant_serve(runs):
    res = _result(runs, "instant_serve")
    assert res["users"] == 2 and res["items"] == 6 and res["bank"]["users"] == 3
    assert "train" in res["trained"] and "train" not in res["instant"]
    # the first answer is the history call, (the training job,) and the first generate
    assert res["ratio_first_answer"] == pytest.approx(res["trained"]["first_answer"]["p50_ms"]
                                                      / res["instant"]["first_answer"]["p50_ms"], rel=0.01)
    assert res["trained"]["first_answer"]["p50_ms"] > res["trained"]["train"]["p50_ms"] * 0.99


def test_task_adapt_scale(runs):
    r = _result(runs, "task_adapt_scale")
    assert r["resample"]["other_users"] == 20 and r["resample"]["items_per_user"] == 6
    un, cap = r["arms"]["uncapped"], r["arms"]["capped"]
    assert cap["tokens_per_epoch"] <= 2000 < un["tokens_per_epoch"]  # over one batch (32 rows), so the cap binds
    assert cap["examples"] == un["examples"] and cap["examples_per_epoch"] < un["examples_per_epoch"]
    # pinned: 140 examples of 4,540 tokens; 2,000 tokens at their mean length hold int(2000 * 140 / 4540) = 61
    assert (un["examples"], un["tokens_per_epoch"], cap["examples_per_epoch"]) == (140, 4540, 61)
    assert cap["steps"] < un["steps"] and cap["base_s"] > 0 and un["base_s"] > 0
    assert set(cap["score"]) == {"rouge-1", "rouge-L"}
    gap = r["gap_vs_uncapped"]["capped"]["rouge-1"]
    assert gap["lo"] <= gap["mean"] <= gap["hi"]
    assert r["time_ratio_capped_vs_uncapped"] > 0
