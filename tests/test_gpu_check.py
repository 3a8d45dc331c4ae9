"""What of the GPU check runs on a CPU: scripts/gpu_check.py's wheel check, install commands and
figure parsing, scripts/bench_learner.py's shapes, batch and MFU, and the two references the GPU
tests compare against (tests/gpu/test_gpu.py): the fp32 step equals the CPU DeepSpeed learner's
(ZeRO-0 and ZeRO-2, gradients read the way the GPU run reads them), and the log-prob kernel's
bf16 error bounds hold for CPU bf16. The whole dry run (`scripts/gpu_check --cpu`, ~1 min) is
opt-in: `-m slow`.
"""

from __future__ import annotations

import json
import math
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, load_script

gpu_check = load_script("gpu_check")
bench = load_script("bench_learner")


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_check_wheels_finds_needs_nothing_meets(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "project_requirements", lambda: ["torch>=2.6", "gguf>=0.10", "omegaconf>=2.3"])
    make_wheel(tmp_path, "omegaconf", "2.4.0", ["PyYAML>=5.1.0"])
    make_wheel(tmp_path, "latex2sympy2_extended", "1.11.0", ["sympy", "antlr4-python3-runtime<=4.13.2,>=4.9.3"])
    make_wheel(tmp_path, "jericho", "3.3.1", ["numpy", "spacy>=2.1.0"])
    make_wheel(tmp_path, "demo", "1.0", ["typing; python_version < '3.5'", "pytest; extra == 'test'"])
    make_wheel(tmp_path, "demo", "1.1", [])
    found = gpu_check.check_wheels(tmp_path, provided=frozenset({"torch", "numpy", "pyyaml", "sympy"}))
    assert found["files"] == 5 and found["duplicates"] == ["demo"]
    missing = set(found["missing"])
    # antlr4 is needed and not carried; gguf (entrorl) and spacy (jericho) are knowingly left out;
    # markers for other Pythons and extras need nothing; the required top-level packages are named
    assert "antlr4-python3-runtime (needed by latex2sympy2-extended)" in missing
    assert not any(m.startswith(("gguf", "spacy", "typing ", "pytest")) for m in missing), missing
    assert {"deepspeed (imported by entrorl)", "textworld (imported by entrorl)"} <= missing
    assert "omegaconf (imported by entrorl)" not in missing


def test_install_commands_pin_what_the_image_lacks_and_take_no_network(tmp_path):
    for name, version in [("deepspeed", "0.19.8"), ("pydantic", "2.14.4"), ("rich", "15.0.0"),
                          ("textworld", "1.7.0"), ("jericho", "3.3.1")]:  # fmt: skip
        make_wheel(tmp_path, name, version, [])
    resolved, no_deps, editable = gpu_check.install_commands("python3", tmp_path)
    assert all("--no-index" in command for command in (resolved, no_deps, editable))
    assert "deepspeed==0.19.8" in resolved and "pydantic==2.14.4" in resolved
    assert not any(arg.startswith("rich") for arg in resolved)  # the image has it: used unless unfit
    assert not any("textworld" in arg or "jericho" in arg for arg in resolved)  # jericho needs spacy
    assert "--no-deps" in no_deps and sorted(Path(a).name.split("-")[0] for a in no_deps if a.endswith(".whl")) == [
        "jericho",
        "textworld",
    ]
    assert editable[-2:] == ["-e", str(ROOT)] and "--no-deps" in editable


def test_carried_wheels_are_complete_and_small():
    if not gpu_check.WHEELS.is_dir():
        pytest.skip("no .gpu-wheels here: scripts/fetch_gpu_wheels fills it")
    found = gpu_check.check_wheels(gpu_check.WHEELS)
    assert found["missing"] == [] and found["duplicates"] == [] and found["tokenizer"], found
    assert found["mib"] < 40  # with the ~2 MiB tree, far under the 64 MiB a device call carries


def test_junit_counts(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.gpu.test_gpu" name="test_a"/>'
        '<testcase classname="tests.gpu.test_gpu" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.gpu.test_gpu" name="test_c"><skipped message="no CUDA"/></testcase>'
        '<testcase classname="tests.gpu.test_gpu" name="test_d"><error message="fixture"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 1, 1)
    assert counts["failed_ids"] == ["tests.gpu.test_gpu::test_b", "tests.gpu.test_gpu::test_d"]
    assert gpu_check.junit_counts(tmp_path / "absent.xml")["passed"] == 0


def test_grpo_figures(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "time/step": 3.0, "time/update": 1.0, "loss/total": 0.5, "learner/grad_norm": 1.0, "learner/optimizer_steps": 1.0},
        {"step": 2, "time/step": 2.0, "time/update": 0.9, "loss/total": 0.4, "learner/grad_norm": 0.8, "learner/optimizer_steps": 1.0},
        {"step": 2, "eval/success": 0.5},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = gpu_check.grpo_figures(metrics)
    assert figures["steps"] == 2 and figures["step_s"] == [3.0, 2.0] and figures["losses_finite"]
    rows[1]["loss/total"] = float("nan")
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not gpu_check.grpo_figures(metrics)["losses_finite"]
    assert not gpu_check.grpo_figures(tmp_path / "absent.jsonl")["losses_finite"]


@pytest.mark.parametrize("shape, published", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304)])
def test_shapes_have_the_published_parameter_counts(shape, published):
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(bench.qwen2_config(shape))
    assert bench.count_params(model) == published  # the tied embedding counted once


def test_mfu_and_the_benchmark_batch():
    assert bench.mfu(1_000_000_000, 50_000.0, 989e12) == pytest.approx(6 * 1e9 * 5e4 / 989e12)
    assert bench.mfu(10, 1.0, None) is None
    fixed = bench.fake_batch(8, 100, 5, vocab=50)
    assert [len(s.response_ids) for s in fixed] == [5] * 8  # the default batch, as before
    assert all(90 <= len(s.prompt_ids) <= 110 for s in fixed)
    varied = [len(s.response_ids) for s in bench.fake_batch(64, 100, 100, vocab=50, jitter=0.9)]
    assert min(varied) >= 10 and max(varied) <= 190 and len(set(varied)) > 20


def test_the_reference_step_is_the_cpu_learner_step(learner_model_dir, tmp_path):
    """The GPU learner test compares against `reference_step` (plain torch, fp32, CPU); here it
    equals the DeepSpeed learner's CPU step, gradients read as on the GPU (ZeRO-0: param.grad;
    ZeRO-2: the partitioned buffers), run through the same worker."""
    from tests.gpu.test_gpu import grad_errors, reference_step, run_learner_worker

    variants = {
        "zero0": ["train.device=cpu", "learner.zero_stage=0"],
        "zero2": ["train.device=cpu", "learner.zero_stage=2"],
        "zero2-packed": ["train.device=cpu", "learner.zero_stage=2", "learner.packing=true"],
    }
    runs = run_learner_worker(learner_model_dir, tmp_path, variants, "cpu")
    loss, grads, norm = reference_step(learner_model_dir)
    for name, run in runs.items():
        assert run["param_device"] == "cpu" and run["param_dtype"] == "torch.float32"
        assert run["metrics"]["loss/policy"] == pytest.approx(loss, abs=1e-7)
        assert run["metrics"]["learner/grad_norm"] == pytest.approx(norm, rel=1e-5)
        errors = grad_errors(run["grads"], grads)
        assert errors["global"] < 1e-5 and errors["tensor"] < 1e-4, (name, errors)
        assert run["sync"]["max_param_diff"] == 0.0 and run["sync"]["max_logit_diff"] <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_kernel_error_bounds_hold_on_the_cpu(dtype):
    from tests.gpu.test_gpu import token_stats_errors

    errors = token_stats_errors("cpu", dtype)
    assert all(value <= 1.0 for value in errors.values()), errors
    if dtype == "bfloat16":  # the bounds are not loose by orders of magnitude either
        assert errors["logprobs"] > 0.05 and errors["entropy"] > 0.05, errors


@pytest.mark.slow
def test_the_cpu_dry_run_end_to_end(request, tmp_path):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("opt in with -m slow (~1 min: `scripts/gpu_check --cpu`)")
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check"), "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and figures["ok"], proc.stdout[-4000:]
    assert figures["tests_skipped"] > 0 and figures["tests_failed"] == 0
    assert figures["grpo_steps"] == 3 and figures["grpo_losses_finite"] and figures["grpo_optimizer_steps"] == 3
    assert figures["tokens_per_s_packed"] > 0 and figures["tokens_per_s_padded"] > 0
    assert math.isclose(figures["packed_over_padded"], figures["tokens_per_s_packed"] / figures["tokens_per_s_padded"], rel_tol=1e-3)
    assert {p.name for p in tmp_path.iterdir()} >= {"gpu_check.log", "summary.json", "bench.json", "grpo-metrics.jsonl"}
