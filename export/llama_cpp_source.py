"""Fetch the llama.cpp source vendored in the pinned llama-cpp-python sdist (the only registry route to it).

Used by the GGUF export (its converter + matching gguf-py) and by the C++ build (CMake runs this file as a script).
The sdist is downloaded once with pip and extracted into a cache folder; nothing of it is ever committed.

    python export/llama_cpp_source.py DEST_DIR   # prints the path of the extracted llama.cpp tree
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep equal to the pin in pyproject.toml: the mtmd API changes between releases


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXSELECT_CACHE", Path.home() / ".cache" / "flexselect"))


def llama_cpp_source(dest: Path | None = None) -> Path:
    """Return the extracted `vendor/llama.cpp` folder, downloading and extracting the sdist on first use."""
    dest = Path(dest or default_cache_dir()) / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    tree = dest / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            tmp,
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        ]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist with pip")
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent))  # same file system as `dest`, so the rename is atomic
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter="data")
            (root,) = staging.iterdir()
            try:
                root.rename(dest)  # atomic: a half-extracted tree is never left at `dest`
            except OSError:
                if not (tree / "CMakeLists.txt").is_file():
                    raise
                # another process (a parallel build or test run) extracted the same sdist first: use its copy
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return tree


if __name__ == "__main__":
    print(llama_cpp_source(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
