"""An installed wheel (not the checkout, not an editable install) holds every module and the shipped recipes:
`badam-hf recipes` lists them and `badam-hf train NAME --check` validates one, from the wheel alone.

The wheel is built offline from a copy of the checkout (`pip wheel --no-build-isolation`, with the
setuptools of the test extra), so the build leaves no build/ or egg-info in the checkout and no stale
build/ of an earlier build can slip into the wheel. It is installed with `pip install --target T`, and the
commands run with `PYTHONPATH=T` from an empty folder: the assertions check that `badam_hf` came from T,
also where an editable install of another checkout sits in the same environment.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # builds and installs a wheel, runs the CLI in subprocesses

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("__pycache__", "*.egg-info", "build", "dist", ".git", ".venv", ".pytest_cache", "runs", "output*")

LOCATE = """
import json, sys
from pathlib import Path
import badam_hf, badam_hf.recipes as R
target = Path(sys.argv[1]).resolve()
assert Path(badam_hf.__file__).resolve().is_relative_to(target), badam_hf.__file__
assert R.shipped_dir() is not None and R.shipped_dir().resolve().is_relative_to(target), R.shipped_dir()
valid = {name: R.load_recipe(name).task for name in R.shipped_recipes()}  # every shipped recipe validates
print(json.dumps({"file": badam_hf.__file__, "shipped": str(R.shipped_dir()), "valid": valid}))
"""


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2] if x.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return ()


def _pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    if _setuptools_version() < (68,):
        pytest.fail("building the wheel offline needs setuptools>=68 in this environment (the `test` extra: "
                    "pip install -e '.[test]'); found " + (".".join(map(str, _setuptools_version())) or "none"))
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    wheels = list((tmp / "dist").glob("badam_hf-*.whl"))
    assert len(wheels) == 1, wheels
    target = tmp / "T"
    _pip("install", "--no-deps", "--no-compile", "--no-index", "-q", "--target", str(target), str(wheels[0]), cwd=tmp)
    return target


def _run(args: list[str], target: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BADAM_HF_RECIPES", "PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_every_module_and_recipe(installed):
    # pyproject.toml lists the packages by hand: a subpackage missing there would be missing here.
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "badam_hf").rglob("*.py") if "__pycache__" not in p.parts}
    wheel = {p.relative_to(installed).as_posix() for p in (installed / "badam_hf").rglob("*.py")}
    assert source <= wheel, f"not in the wheel: {sorted(source - wheel)}"
    shipped = installed / "badam_hf" / "recipes" / "shipped"
    assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    # The console script's target exists in the wheel.
    (dist_info,) = installed.glob("badam_hf-*.dist-info")
    entry_points = configparser.ConfigParser()
    entry_points.read(dist_info / "entry_points.txt")
    module, _, func = entry_points["console_scripts"]["badam-hf"].partition(":")
    path = installed / Path(*module.split(".")).with_suffix(".py")
    assert path.is_file(), module
    assert func in {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_installed_wheel_lists_and_checks_the_shipped_recipes(installed, tmp_path):
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert len(names) == 12, names

    proc = _run(["-c", LOCATE, str(installed)], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(found["valid"]) == names

    proc = _run(["-m", "badam_hf", "recipes"], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert listed == names, proc.stdout

    proc = _run(["-m", "badam_hf", "train", "demo", "--check"], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    shipped = Path(found["shipped"])
    assert f"{shipped / 'demo.yaml'}: valid (causal-lm;" in proc.stdout, proc.stdout
    # A hub model that is not in the cache cannot run under HF_HUB_OFFLINE=1 (set by _run): --check says so.
    proc = _run(["-m", "badam_hf", "train", "llama3-8b-alpaca-gpt4", "--check",
                 "model.name_or_path=badam-hf-tests/not-a-model"], installed, tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert f"{shipped / 'llama3-8b-alpaca-gpt4.yaml'}: model.name_or_path='badam-hf-tests/not-a-model' is not a " \
           "local folder and not in the Hugging Face cache" in proc.stderr, proc.stderr
