// Makes the operator library importable as the Python module `nanomoe._C`. Importing it runs the
// static TORCH_LIBRARY registrations; the module itself defines nothing. Built by setup.py only:
// the libtorch library (CMakeLists.txt) needs no Python.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
