"""The package without its C++ extension, or with a stale one: it imports, warns once,
and the pure-PyTorch backends work."""

import subprocess
import sys
import textwrap

import pytest


def _run(prelude: str) -> subprocess.CompletedProcess:
    program = textwrap.dedent(prelude) + textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastcaps
        import torch
        messages = [str(w.message) for w in caught if "fastcaps" in str(w.message)]
        print(len(messages))
        print(messages[0] if messages else "")
        u, w = torch.randn(2, 5, 3), torch.randn(4, 5, 6, 3)
        v = fastcaps.dynamic_routing(u, w, backend="torch")
        torch.testing.assert_close(v, fastcaps.dynamic_routing(u, w, backend="reference"))
        print("routed")
    """)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "prelude, expected",
    [
        # The extension missing (a checkout that was never built): its import fails.
        ("import sys; sys.modules['fastcaps._C'] = None\n",
         ["could not be loaded", "pip install --no-build-isolation"]),
        # A stale build: compiled against another torch than the one running.
        ("import torch; torch.__version__ = '9.9.9'\n",
         ["built against torch", "torch 9.9.9 is running", "pip install --no-build-isolation"]),
    ],
    ids=["missing", "stale"],
)
def test_unusable_extension_warns_once_and_routing_works(prelude, expected):
    result = _run(prelude)
    assert result.returncode == 0, result.stderr
    count, message, routed = result.stdout.strip().splitlines()
    assert count == "1" and routed == "routed"
    for fragment in expected:
        assert fragment in message


def test_installed_extension_loads_without_warning():
    result = _run("")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "0"
