"""The sdist carries what a build from it needs: every C++ source and header the translation
units include, and every Python module (python -m build --sdist --no-isolation, as the
README says; installing from it is checked by hand, it compiles for minutes)."""

import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "setup.py").exists() or not (ROOT / "csrc").is_dir(),
                    reason="needs the source tree")
def test_sdist_ships_every_source_and_header(tmp_path):
    pytest.importorskip("build")
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (archive,) = tmp_path.glob("fastcaps-*.tar.gz")
    with tarfile.open(archive) as sdist:
        shipped = {pathlib.PurePosixPath(name).relative_to(pathlib.PurePosixPath(name).parts[0]).as_posix()
                   for name in sdist.getnames() if len(pathlib.PurePosixPath(name).parts) > 1}
    needed = [path.relative_to(ROOT).as_posix() for pattern in ("csrc/**/*.cpp", "csrc/**/*.h", "fastcaps/**/*.py")
              for path in ROOT.glob(pattern)]
    assert needed and not [path for path in needed if path not in shipped]
