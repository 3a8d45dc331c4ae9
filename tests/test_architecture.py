"""Import rules of DESIGN.md ("Layout and dependency direction"), checked by an ast scan.

environments <- agents <- trainer: environments imports no project code; agents never imports
trainer; trainer sees agents only through its types, config, rollout, tasks and engines, and
never imports environments. Only trainer/learner/ imports deepspeed; only agents/engines/
imports vllm. Imports inside functions count too (the heavy ones are meant to be lazy there).

Run: .venv/bin/python -m pytest tests/test_architecture.py -q
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "environments", "trainer")
TRAINER_MAY_IMPORT = (
    "agents.types",
    "agents.config",
    "agents.rollout",
    "agents.tasks",
    "agents.engines",
    "agents.chat_data",  # SFT demonstrations from chat files, as Trajectory records
)
HEAVY = ("torch", "transformers", "deepspeed", "vllm")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    here = module_name(path)
    return imports_in(path.read_text(), here if path.name == "__init__.py" else here.rpartition(".")[0])


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, at any depth; relative imports
    resolve against `package`, the package the source file is in."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] in PACKAGES:  # `from agents import types` names agents.types
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


ALL_IMPORTS = [
    (path.relative_to(ROOT).as_posix(), line, name)
    for package in PACKAGES
    for path in sources(package)
    for line, name in imports_of(path)
]


def is_in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(where: str, rule) -> list[str]:
    return [
        f"{file}:{line} imports {name}"
        for file, line, name in ALL_IMPORTS
        if file.startswith(where) and rule(name)
    ]


def test_the_scan_sees_every_package():
    for package in PACKAGES:
        assert sources(package), f"no .py files under {package}/"
    assert any(name == "deepspeed" for _, _, name in ALL_IMPORTS), "scan found no deepspeed import at all"


def test_environments_import_no_project_code():
    assert violations("environments/", lambda name: is_in(name, ("agents", "trainer"))) == []


def test_agents_never_import_trainer():
    assert violations("agents/", lambda name: is_in(name, ("trainer",))) == []


def test_trainer_sees_agents_only_through_its_contracts():
    bad = violations(
        "trainer/",
        lambda name: (
            is_in(name, ("environments",))
            or (is_in(name, ("agents",)) and not is_in(name, TRAINER_MAY_IMPORT))
        ),
    )
    assert bad == []


@pytest.mark.parametrize("heavy, home", [("deepspeed", "trainer/learner/"), ("vllm", "agents/engines/")])
def test_heavy_backends_have_one_home(heavy, home):
    outside = [
        f"{file}:{line} imports {name}"
        for file, line, name in ALL_IMPORTS
        if is_in(name, (heavy,)) and not file.startswith(home)
    ]
    assert outside == []


def test_scanner_resolves_every_import_form():
    source = (
        "import deepspeed.comm, os\n"
        "from agents import rollout, types\n"
        "from . import losses\n"
        "def lazy():\n"
        "    from ..batch import make_micro_batch\n"
        "    import vllm\n"
    )
    assert sorted(name for _, name in imports_in(source, "trainer.learner")) == [
        "agents.rollout",
        "agents.types",
        "deepspeed.comm",
        "os",
        "trainer.batch.make_micro_batch",
        "trainer.learner.losses",
        "vllm",
    ]


def test_packages_import_light_and_from_this_repo():
    """`import agents, environments, trainer` pulls in no torch/transformers/deepspeed/vllm, and
    the names are ours (the OpenAI Agents SDK also installs a top-level `agents`)."""
    code = (
        "import json, sys\n"
        "import agents, environments, trainer\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps({'heavy': heavy, 'files': [agents.__file__, environments.__file__, trainer.__file__]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"package __init__s import heavy modules: {report['heavy'][:10]}"
    for file in report["files"]:
        assert Path(file).resolve().is_relative_to(ROOT), f"{file} is not inside {ROOT}"


def test_packages_resolve_inside_this_repo_from_elsewhere(tmp_path):
    """From another working directory too (installed, not just found on the cwd)."""
    code = "import agents, environments, trainer; print(agents.__file__); print(environments.__file__); print(trainer.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for file in out.stdout.split():
        assert Path(file).resolve().is_relative_to(ROOT), f"{file} is not inside {ROOT}"
