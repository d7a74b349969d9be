// The baseline build of the EM-routing kernels: 16-byte vectors (SSE2 on x86-64, NEON on
// aarch64), compiled for whatever the compiler targets by default. Every CPU runs it.

#include "../common/builds.h"

#define FASTCAPS_ISA baseline
#define FASTCAPS_VECTOR_BYTES 16
#include "kernels.h"
