"""The package without its C++ extension, with a stale one, or without triton: it imports,
the pure-PyTorch backends work, "auto" says once which kernel it runs instead, and forcing
the missing backend raises an error that says how to get it. A broken extension also warns
once at import."""

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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                torch.testing.assert_close(fastcaps.dynamic_routing(u, w), v)
        said = [str(w.message) for w in caught if "fastcaps" in str(w.message)]
        print(len(said))
        print(said[0] if said else "")
        try:
            fastcaps.dynamic_routing(u, w, backend="cpu")
            print("cpu ran")
        except RuntimeError as error:
            print(str(error).replace("\\n", " "))
    """)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)


# Builds and loads, in the child, a library standing in for fastcaps._C built from older
# sources: the same _built_with_torch, a forward kernel with the old signature.
_STALE_SOURCES_PRELUDE = '''
import os, sys, tempfile, types
import torch
from torch.utils import cpp_extension
source = """
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <torch/version.h>
#include <string>
#include <tuple>
std::string built_with_torch() { return TORCH_VERSION; }
std::tuple<at::Tensor, at::Tensor> old_forward(const at::Tensor& u, const at::Tensor& weight, const at::Tensor& bias,
                                               int64_t iterations) { return {u, u}; }
TORCH_LIBRARY_FRAGMENT(fastcaps, m) { m.def("_built_with_torch() -> str", &built_with_torch); }
TORCH_LIBRARY_IMPL(fastcaps, CPU, m) { m.impl("routing_cpu_forward", &old_forward); }
"""
build = tempfile.mkdtemp()
with open(os.path.join(build, "stale.cpp"), "w") as handle:
    handle.write(source)
cpp_extension.load("fastcaps_stale", [os.path.join(build, "stale.cpp")], build_directory=build,
                   is_python_module=False, verbose=False)
sys.modules["fastcaps._C"] = types.ModuleType("fastcaps._C")  # loaded above
'''


@pytest.mark.parametrize(
    "prelude, expected",
    [
        # The extension missing (a checkout that was never built): its import fails.
        ("import sys; sys.modules['fastcaps._C'] = None\n",
         ["could not be loaded", "pip install --no-build-isolation"]),
        # A stale build: compiled against another torch than the one running.
        ("import torch; torch.__version__ = '9.9.9'\n",
         ["built against torch", "torch 9.9.9 is running", "pip install --no-build-isolation"]),
        # A stale build: compiled from older fastcaps sources whose forward kernel took four
        # arguments. Without the check it aborts the process while the library loads.
        (_STALE_SOURCES_PRELUDE,
         ["is stale: its kernels do not match", "operator: fastcaps::routing_cpu_forward",
          "The number of arguments is different", "pip install --no-build-isolation"]),
    ],
    ids=["missing", "stale-torch", "stale-sources"],
)
def test_unusable_extension_warns_once_and_routing_works(prelude, expected):
    result = _run(prelude)
    assert result.returncode == 0, result.stderr
    count, message, routed, auto_count, auto_message, forced = result.stdout.strip().splitlines()
    assert count == "1" and routed == "routed"
    for fragment in expected:
        assert fragment in message
    # Three "auto" calls: one warning, naming what runs and why the C++ kernels do not.
    assert auto_count == "1"
    assert "backend='auto' on cpu tensors runs the 'torch' kernel, because 'cpu' is unavailable:" in auto_message
    for fragment in expected:
        assert fragment in auto_message
    assert forced.startswith("backend='cpu' cannot run on cpu:") and "pip install --no-build-isolation" in forced


def test_installed_extension_loads_without_warning():
    result = _run("")
    assert result.returncode == 0, result.stderr
    count, _, routed, auto_count, _, forced = result.stdout.splitlines()
    assert (count, routed, auto_count, forced) == ("0", "routed", "0", "cpu ran")


def test_without_triton_import_works_and_forcing_it_says_how_to_install():
    program = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import warnings
        import torch
        import fastcaps
        assert "triton" not in fastcaps.available_backends("cpu")
        u, w = torch.randn(2, 5, 3), torch.randn(4, 5, 6, 3)
        try:
            fastcaps.dynamic_routing(u, w, backend="triton")
        except RuntimeError as error:
            print(error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(fastcaps.backends.resolve_backend("auto", torch.device("cuda")))
            fastcaps.backends.resolve_backend("auto", torch.device("cuda"))
        print(len(caught), caught[0].message)
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    forced, auto, said = result.stdout.strip().splitlines()
    assert forced == ("backend='triton' cannot run on cpu: triton is not installed. Install it with: "
                      "pip install triton  (Linux; CUDA tensors need an NVIDIA GPU)")
    assert auto == "torch"
    assert said.startswith("1 fastcaps: backend='auto' on cuda tensors runs the 'torch' kernel, because 'triton' "
                           "is unavailable: triton is not installed.")
