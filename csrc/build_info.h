// NOTE (kt-sft engine, build info)
// build_info_json() is defined in a unit that setup.py (BuildEngine) generates for every build: a JSON object with
// the commit, the compiler (its --version line), the Python ABI, pybind11's version, the base / link flags and each
// ISA unit's target flags. It travels inside the binary, so a copied or installed .so reports how it was built
// (`python -m kt_sft env`, kt_sft.engine.runtime.build_info()).
#pragma once

namespace kt_sft {

const char* build_info_json();

}  // namespace kt_sft
