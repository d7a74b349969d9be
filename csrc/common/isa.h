// Which instruction-set build of the C++ kernels runs: one choice per process, shared by every
// op's kernels (dynamic routing, EM routing), so that FASTCAPS_CPU_ISA means the same for all.

#pragma once

#include <string>
#include <vector>

namespace fastcaps {

struct IsaBuild {
  const char* name;
  bool (*runs_here)();
};

// The builds this compiler makes, widest first: avx512, avx2, baseline on x86-64 with GCC;
// the baseline alone elsewhere (builds.h).
const std::vector<IsaBuild>& isa_builds();

// FASTCAPS_CPU_ISA's build if set (an error if this CPU cannot run it or it names none),
// else the widest the CPU runs. Chosen on the first call and kept for the process.
const std::string& chosen_isa();

// Index of chosen_isa() in isa_builds(): every op's table of builds lists them in that order.
std::size_t chosen_isa_index();

}  // namespace fastcaps
