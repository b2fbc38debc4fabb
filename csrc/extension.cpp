// The sgdm._C module: importing it registers every sgdm:: op (each op's
// schema lives in csrc/<op>.cpp) plus two helpers to inspect and override the
// per-ISA CPU kernel choice.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

namespace {

std::string cpu_isa() { return sgdm::cpu::isa_name(sgdm::cpu::active_isa()); }

std::string set_cpu_isa(std::string name) { return sgdm::cpu::set_isa_override(name); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgdm, m) {
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_set_cpu_isa(str name) -> str", &set_cpu_isa);
}

// A plain module with no methods: the ops are reached through torch.ops.sgdm.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
