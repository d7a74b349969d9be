// Which instruction-set builds of the CPU kernels this compiler makes, and the headers from
// outside fastcaps that they include.
//
// A build is a translation unit that includes system_headers() first, then switches the
// target (#pragma GCC target) and includes the kernels: everything outside fastcaps is then
// compiled for the baseline, so no inline function shared between translation units (a
// std::vector member, an ATen template) can carry AVX instructions into code that runs on a
// CPU without them. The kernels themselves have internal linkage per build.

#pragma once

// x86-64 with GCC: AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline (SSE2).
// Elsewhere (aarch64: NEON is the baseline), the baseline build alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTCAPS_X86_BUILDS 1
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
