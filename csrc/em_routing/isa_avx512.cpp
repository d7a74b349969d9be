// The AVX-512 (x86-64-v4: AVX512F, BW, CD, DQ, VL) build of the EM-routing kernels: 64-byte vectors.

#include "../common/builds.h"

#if defined(FASTCAPS_X86_BUILDS)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FASTCAPS_ISA avx512
#define FASTCAPS_VECTOR_BYTES 64
#include "kernels.h"
#pragma GCC pop_options
#endif
