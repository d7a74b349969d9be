"""The sdist carries what a build from it needs: every C++ source and header the translation
units include, and every Python module (python -m build --sdist --no-isolation, as the
README says; installing from it is checked by hand, it compiles for minutes).

The sdist is built from a copy of the files git tracks, so that no egg-info left by an
earlier build (whose SOURCES.txt setuptools would reuse) can stand in for MANIFEST.in."""

import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines() if line]


def test_sdist_ships_every_source_and_header(tmp_path):
    pytest.importorskip("build")
    tracked = _tracked_files()
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
                            cwd=source, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (archive,) = tmp_path.glob("fastcaps-*.tar.gz")
    with tarfile.open(archive) as sdist:
        shipped = {"/".join(pathlib.PurePosixPath(name).parts[1:]) for name in sdist.getnames()}
    needed = [name for name in tracked if name.startswith(("csrc/", "fastcaps/")) and name.endswith((".cpp", ".h", ".py"))]
    assert needed and not [name for name in needed if name not in shipped]
