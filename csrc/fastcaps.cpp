// fastcaps C++ extension: kernels that plug into the ops defined in Python (fastcaps/ops/).
//
// The op schemas live in Python (torch.library.custom_op); C++ only implements. This file
// also records the torch version the extension was compiled against, so that Python can
// tell a stale build (compiled against another torch) from a working one and say so.

#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

namespace fastcaps {

std::string built_with_torch() {
  return TORCH_VERSION;
}

}  // namespace fastcaps

TORCH_LIBRARY_FRAGMENT(fastcaps, m) {
  m.def("_built_with_torch() -> str", &fastcaps::built_with_torch);
}

// An importable module, so `from fastcaps import _C` loads the library and runs the
// registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
