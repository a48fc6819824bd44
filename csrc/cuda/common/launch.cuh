// Host-side launch helpers shared by the forward (fwd/launch.cuh) and the backward (bwd/launch.cuh)
// launchers: the element type of a dtype tag, the dynamic shared-memory opt-in once per (kernel, device) and
// the grid-checked launch. Included by the instantiation files only (through the launchers).
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/common/problem.h"
#include "cuda/common/row_tiles.cuh"

namespace bsattn {
namespace cuda {

template <int kDType>
struct DTypeOf;
template <>
struct DTypeOf<kBF16> {
  using type = __nv_bfloat16;
};
template <>
struct DTypeOf<kF16> {
  using type = __half;
};

// Raises the kernel's dynamic shared-memory limit on the current device, once per device. `done` must
// be distinct per kernel (every instantiation has the same function type): the caller owns it.
// The shared-memory carveout asks for what `ctas` CTAs need (+1 KB each reserved by the system); the rest
// of the SM's unified memory stays L1.
template <typename Kernel>
cudaError_t opt_in_smem(Kernel kernel, int bytes, int ctas, std::atomic<uint64_t>& done) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err != cudaSuccess) return err;
  int pct = per_sm > 0 ? static_cast<int>((int64_t{ctas} * (bytes + 1024) * 100 + per_sm - 1) / per_sm) : 100;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, pct > 100 ? 100 : pct);
  if (err != cudaSuccess) return err;
  done.fetch_or(bit, std::memory_order_acq_rel);
  return cudaSuccess;
}

// Whether the current device is compute capability 9.0 exactly (H100 / H200): the only one that runs sm_90a
// code (wgmma). Queried once per device.
inline bool device_runs_sm90a() {
  static std::atomic<uint64_t> known{0}, yes{0};  // per device bit
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return false;
  const uint64_t bit = uint64_t{1} << dev;
  if (known.load(std::memory_order_acquire) & bit) return (yes.load(std::memory_order_relaxed) & bit) != 0;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  if (major == 9 && minor == 0) yes.fetch_or(bit, std::memory_order_relaxed);
  known.fetch_or(bit, std::memory_order_release);
  return major == 9 && minor == 0;
}

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch (common/pdl.cuh): its CTAs may
// start before the previous kernel in the stream has finished. Returns the launch's error.
template <typename... KArgs, typename... Args>
cudaError_t launch_dependent(void (*kernel)(KArgs...), dim3 grid, dim3 block, int smem, cudaStream_t stream,
                             const Args&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Launches `kernel(p, extra...)` on `grid` CTAs of `threads` threads with `smem` bytes of dynamic shared memory, after
// the opt-in above (`ctas` CTAs per SM, `done` owned by the caller, one per kernel). An empty grid launches
// nothing; a grid beyond INT_MAX CTAs is cudaErrorInvalidConfiguration. Returns cudaGetLastError().
// Dependent: a programmatic dependent launch (common/pdl.cuh: the kernel must call pdl_wait first).
template <bool Dependent = false, typename Kernel, typename P, typename... Extra>
cudaError_t launch_kernel(Kernel kernel, int64_t grid, int threads, int smem, int ctas,
                          std::atomic<uint64_t>& done, const P& p, cudaStream_t stream, const Extra&... extra) {
  if (grid == 0) return cudaSuccess;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  cudaError_t err = opt_in_smem(kernel, smem, ctas, done);
  if (err != cudaSuccess) return err;
  if (!Dependent) {
    kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(p, extra...);
    return cudaGetLastError();
  }
  return launch_dependent(kernel, dim3(static_cast<unsigned>(grid)), dim3(threads), smem, stream, p, extra...);
}

// One CTA per tile of Cfg::TM packed query rows (common/row_tiles.cuh: the forward kernels and dq). P: the
// kernel's parameter block (its nsplit set here on a copy).
template <auto Kernel, class Cfg, class P>
cudaError_t launch_row_tiles(const P& p0, cudaStream_t stream) {
  P p = p0;
  const int64_t grid = row_tile_grid<Cfg::TM>(p);
  static std::atomic<uint64_t> smem_done{0};  // one per kernel
  return launch_kernel(Kernel, grid, Cfg::NT, Cfg::SMEM, Cfg::MINB, smem_done, p, stream);
}

// Whether the environment variable `name` is set to `value` (the launchers' A / B switches; callers read it once).
inline bool env_equals(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

// The environment variable `name` as an integer (std::atoll), or `fallback` where it is unset (callers read it once).
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* e = std::getenv(name);
  return e != nullptr ? static_cast<int64_t>(std::atoll(e)) : fallback;
}

// An attribute of the current device, queried once per device (0 if unknown); `cache` is the caller's, one per
// attribute.
inline int cached_device_attribute(cudaDeviceAttr attr, std::atomic<int> (&cache)[64]) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n > 0) return n;
  if (cudaDeviceGetAttribute(&n, attr, dev) != cudaSuccess) return 0;
  cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// The current device's SM count.
inline int device_sm_count() {
  static std::atomic<int> cache[64];
  return cached_device_attribute(cudaDevAttrMultiProcessorCount, cache);
}

// The current device's opt-in shared memory per block (bytes).
inline int device_smem_optin() {
  static std::atomic<int> cache[64];
  return cached_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, cache);
}

// How many chunks the `heads` (batch, KV head) pairs of a column-oriented grid run in (bwd/common.cuh column_tile):
// as many as possible with each chunk at least one wave of CTAs (`per_head` CTAs per head, `per_sm` per SM).
inline int column_head_chunks(int64_t heads, int64_t per_head, int per_sm) {
  const int sms = device_sm_count();
  const int64_t wave = static_cast<int64_t>(sms > 0 ? sms : 132) * per_sm;
  const int64_t min_heads = per_head > 0 ? (wave + per_head - 1) / per_head : 1;
  const int64_t n = heads / (min_heads > 0 ? min_heads : 1);
  return static_cast<int>(n < 1 ? 1 : n > INT_MAX ? INT_MAX : n);
}

// A column-oriented grid: one tile of Cfg::BK keys of a block column for every (batch, KV head, block column), the
// tiles in bwd/common.cuh column_tile's order. Sets p.nkc and p.head_chunks (BSATTN_BWD_ORDER=head: one head per
// chunk, for A / B; read once) and returns the number of tiles.
template <class Cfg, class P>
int64_t column_tiles_setup(P& p) {
  p.nkc = static_cast<int>((static_cast<int64_t>(p.C) + Cfg::BK - 1) / Cfg::BK);
  const int64_t per_head = static_cast<int64_t>(p.NB) * p.nkc;
  const int64_t heads = static_cast<int64_t>(p.B) * p.Hk;
  static const bool head_major = env_equals("BSATTN_BWD_ORDER", "head");
  p.head_chunks = head_major ? static_cast<int>(heads) : column_head_chunks(heads, per_head, Cfg::MINB);
  // (the backward's column split: split_slots work items per head, its pieces and empty slots, in place of NB)
  return p.split_items != nullptr ? heads * p.split_slots * p.nkc : heads * per_head;
}

// One CTA per tile of such a grid: the column-oriented backward kernels (bwd/dkdv_kernel.cuh, bwd_sm90/). P: their
// parameter block (set up on a copy). `threads`, `smem`: the CTA's; `extra`: kernel arguments after the parameter
// block.
template <auto Kernel, class Cfg, class P, typename... Extra>
cudaError_t launch_column_tiles(const P& p0, cudaStream_t stream, int threads, int smem, const Extra&... extra) {
  P p = p0;
  const int64_t tiles = column_tiles_setup<Cfg>(p);
  static std::atomic<uint64_t> smem_done{0};  // one per kernel
  return launch_kernel(Kernel, tiles, threads, smem, Cfg::MINB, smem_done, p, stream, extra...);
}

// The small-block kernels' grid (bwd/dkdv_kernel.cuh, bwd/dkdv_compact_kernel.cuh, bwd_sm90/pack_kernel.cuh): one CTA
// per group of `keys` / C block columns of every (batch, KV head) (bwd/common.cuh column_group); p.pack and p.nkc set
// on a copy.
template <auto Kernel, class P>
cudaError_t launch_column_groups(const P& p0, cudaStream_t stream, int keys, int threads, int smem, int ctas) {
  P p = p0;
  p.pack = keys / p.C;
  p.nkc = 1;
  const int64_t grid = static_cast<int64_t>(p.B) * p.Hk * ((p.NB + p.pack - 1) / p.pack);
  static std::atomic<uint64_t> smem_done{0};  // one per kernel
  return launch_kernel(Kernel, grid, threads, smem, ctas, smem_done, p, stream);
}

}  // namespace cuda
}  // namespace bsattn
