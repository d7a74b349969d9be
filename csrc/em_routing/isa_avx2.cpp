// The AVX2 + FMA (x86-64-v3) build of the EM-routing kernels: 32-byte vectors.

#include "../common/builds.h"

#if defined(FASTCAPS_X86_BUILDS)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FASTCAPS_ISA avx2
#define FASTCAPS_VECTOR_BYTES 32
#include "kernels.h"
#pragma GCC pop_options
#endif
