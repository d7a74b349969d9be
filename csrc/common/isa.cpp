// The one choice of instruction-set build (isa.h).

#include "isa.h"

#include "builds.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace fastcaps {

const std::vector<IsaBuild>& isa_builds() {
  static const std::vector<IsaBuild> all = {
#if defined(FASTCAPS_X86_BUILDS)
      {"avx512", [] { return __builtin_cpu_supports("x86-64-v4") > 0; }},
      {"avx2", [] { return __builtin_cpu_supports("x86-64-v3") > 0; }},
#endif
      {"baseline", [] { return true; }},
  };
  return all;
}

namespace {

std::string names_of_builds() {
  std::string names;
  for (const IsaBuild& build : isa_builds()) names += (names.empty() ? "" : ", ") + std::string(build.name);
  return names;
}

std::size_t choose() {
  const std::vector<IsaBuild>& builds = isa_builds();
  const char* forced = std::getenv("FASTCAPS_CPU_ISA");
  if (forced == nullptr || *forced == '\0') {
    for (std::size_t i = 0; i < builds.size(); ++i)
      if (builds[i].runs_here()) return i;
  }
  for (std::size_t i = 0; i < builds.size(); ++i) {
    if (forced == std::string(builds[i].name)) {
      TORCH_CHECK(builds[i].runs_here(), "FASTCAPS_CPU_ISA=", forced, ": this CPU cannot run the ", forced,
                  " build of fastcaps' C++ kernels");
      return i;
    }
  }
  TORCH_CHECK(false, "FASTCAPS_CPU_ISA=", forced, " is not a build of fastcaps' C++ kernels; expected one of ",
              names_of_builds());
  return 0;
}

}  // namespace

std::size_t chosen_isa_index() {
  static const std::size_t index = choose();
  return index;
}

const std::string& chosen_isa() {
  static const std::string name = isa_builds()[chosen_isa_index()].name;
  return name;
}

}  // namespace fastcaps
