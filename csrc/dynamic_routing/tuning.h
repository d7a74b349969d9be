// The C++ dynamic-routing kernels' tuning thresholds, together, each with how it was chosen.
// They change the schedule and so the order of some sums, never the arithmetic of a sample:
// results stay bitwise the same for any thread count (tests/test_cpu_kernels.py).
//
// Per instruction set: every build (isa_*.cpp) compiles this file with its own vector width,
// so the thresholds counted in blocks scale with it (a block is kLanes capsules: 16 float32
// in the AVX-512 build, 8 in AVX2, 4 in the baseline), and those counted in samples or bytes
// do not. None has been measured to want another value on another instruction set; where
// one does, it is set here per FASTCAPS_VECTOR_BYTES. Register blocking follows the build's
// register count (kAccumulators, csrc/common/simd.h).

#pragma once

#include "../common/simd.h"

#include <cstdint>

FASTCAPS_KERNELS_BEGIN

// Capsule sums are combined per chunk of this many blocks (64 MNIST capsules in float32 on
// AVX-512, 32 on AVX2):
// the unit of work when few samples are split across threads. Chosen by reasoning, not by a
// sweep: a chunk's packed W (4 blocks x Din x J*D vectors, 320 KB at the MNIST shape) fits
// in a core's L2 beside the sample's u_hat, and the MNIST shape's 72 blocks give 18 chunks,
// enough to balance 2 threads (not measured at 16 or more).
constexpr int64_t kChunkBlocks = 4;

// u_hat buffers are held for a group of samples at a time, at most this many bytes (11
// MNIST samples in float32): each chunk's W is then packed once per group, and memory stays
// bounded whatever the batch. Chosen by reasoning, not by a sweep: about a quarter of a
// 32 MB L3, so the group's u_hat and W stay in cache across the r passes.
constexpr int64_t kGroupBytes = int64_t(8) << 20;

// Passes run one sample per thread, over a shared packed copy of W, from this many samples
// per thread; below it, each pass is split over chunks of capsules (see run_passes). Set when
// the two schedules were written (commit 4893281), by reasoning, not by a sweep: packing all
// of W (5.9 MB at the MNIST shape) once per call pays off once each thread has a few samples
// to route over it, and costs more than the routing at B = 1.
constexpr int64_t kSamplesPerThread = 4;

// Samples whose u_hat is formed together, each vector of W read once for all of them (the
// routing passes' first pass and phase B), and whose grad W terms phase B adds in one
// read-modify-write of grad W: with one sample at a time, W streamed from L3 (the forward)
// or L2 (phase B) once per sample and the FMA units waited on it (perf on AVX2, Zen 3).
// 4, not swept: 4 samples x 2 outputs fill half of AVX2's 16 registers. Measured on AVX2
// with the other changes of issue 17 (docs/benchmarks.md): forward+backward at MNIST
// B = 128 from 4.18x to 4.66x the reference. Costs 3 more u_hat buffers per thread (2.2 MB
// at the MNIST shape) in the many-samples schedule.
constexpr int64_t kSampleTile = 4;

// Blocks whose coupling dot products a routing pass takes together (capsule_dots), each
// broadcast of a sample's V (and sigma) loaded once for them: with one block at a time the
// dots were bound by those loads (perf on AVX2, Zen 3). At most kChunkBlocks (a chunk's
// blocks). Measured on AVX2 (Zen 3, 2026-12-02, benchmarks/ab_kernels.py against the code
// before, with phase B's fused grad u and grad W): 2 gave forward 1.00x, forward+backward
// 1.05x at MNIST B = 128; 4 gave 1.06x-1.11x and 1.07x (docs/benchmarks.md).
constexpr int64_t kDotBlocks = 4;
static_assert(kDotBlocks <= kChunkBlocks, "kDotBlocks: a group of blocks lies within a chunk");

// Up to this many samples phase B reads W in its own layout (gradient_block_from_kept);
// beyond, packing each block of W once for the batch costs less than its per-sample loops.
// (Measured with the kept u_hat, alternating in one process: faster at B = 1 only.)
constexpr int64_t kNativeGradientSamples = 1;

// Batches of at most this many samples keep the forward's u_hat for the backward: up to 2.9 MB
// at the MNIST shape, half of W. At these batches a call's cost is moving W (5.9 MB against
// 0.7 MB of u_hat per sample); with u_hat kept the backward packs W at most once instead of
// twice. Measured with benchmarks/small_batch_backward.py: 1.80x faster backward at B = 1,
// 1.36x at B = 4 (AVX-512, 2026-11-22); 1.88x and 1.20x in the AVX2 build (Zen 3, 2026-12-01,
// benchmarks/results/cpu-small-batch-backward-zen3-avx2.txt). The Python launcher asks
// for it (routing_cpu_kept_layout).
constexpr int64_t kKeepUHatSamples = 4;

FASTCAPS_KERNELS_END
