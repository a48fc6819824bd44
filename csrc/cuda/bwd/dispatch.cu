// Which backward runs: on an H100 / H200 the row-oriented kernel (bwd_sm90/rows_kernel.cuh: D = 64 or 128, C <= 16,
// R * g >= 128 or R * g >= 64 with C <= 8 at D = 128, C <= 4 at D = 64, params.h rows_sm90_rule) where the caller gave
// its workspace; else the Hopper one-pass kernel (bwd_sm90/: dq through atomic adds into a float32 workspace) when the
// caller gave that workspace, the device is compute capability 9.0 with the sm_90a build, the head dim is 64 or 128 and
// C > 16, the packed small-block rule or the sweep's holds (params.h bwd_sm90_applies); otherwise the deterministic
// pair, dk / dv then dq (bwd/launch.cuh; on such a device dq on wgmma where R * g > 16, bwd_sm90/dq_kernel.cuh, and
// dk / dv on wgmma for 8 < C <= 16 at D = 128 and every C > 8 at D = 256, bwd_sm90/dkdv_narrow_kernel.cuh).
// Host code only: it calls the launchers through their declarations (params.h), so no kernel is instantiated here.
#include <cuda_runtime.h>

#include "cuda/bwd/params.h"
#include "cuda/common/launch.cuh"

namespace bsattn {
namespace cuda {

// (declared in cuda/handlers.h: the module's query, _bsattn_cuda.sm90_kernels)
bool sm90_kernels_built() {
#ifdef BSATTN_WITH_SM90
  return true;
#else
  return false;
#endif
}

namespace bwd {

bool runs_rows_sm90(const Params& p, int D, bool run_dq, bool run_dkdv) {
#ifdef BSATTN_WITH_SM90
  // the row-oriented backward where its rule holds and the caller gave its workspace; BSATTN_BWD_ROWS=0: never, unless
  // the caller gave no column view (col_indptr null): the lowering chose this kernel then (its environment read at
  // trace time wins over this one, read once)
  static const bool no_rows = env_equals("BSATTN_BWD_ROWS", "0");
  return (!no_rows || p.col_indptr == nullptr) && run_dq && run_dkdv && rows_sm90_rule(p, D) &&
         p.dq_accum != nullptr && p.dq_accum_words >= rows_workspace_words(p, D) && device_runs_sm90a();
#else
  return false;
#endif
}

template <int kDType, int kD>
cudaError_t launch_bwd(const Params& p, cudaStream_t stream, bool run_dq, bool run_dkdv) {
#ifdef BSATTN_WITH_SM90
  if constexpr (kD == 64 || kD == 128) {
    if (runs_rows_sm90(p, kD, run_dq, run_dkdv)) return launch_bwd_rows_sm90<kDType, kD>(p, stream);
  }
  if constexpr (kD <= 128) {
    // elsewhere at C <= 16 the deterministic kernels' 16-key, packed and compact tiles measured faster
    if (has_dq_workspace(p, kD) && run_dq && bwd_sm90_applies(p, kD) && device_runs_sm90a())
      return launch_bwd_sm90<kDType, kD>(p, stream);
  }
#endif
  cudaError_t err = cudaSuccess;
  if (run_dkdv) {
    bool done = false;
#ifdef BSATTN_WITH_SM90
    if constexpr (kD == 128 || kD == 256) {
      // dk / dv on wgmma for narrow block columns (D = 256: every C > 8); BSATTN_BWD_DKDV=mma: the mma.sync column
      // tile (A / B; read once)
      static const bool mma_dkdv = env_equals("BSATTN_BWD_DKDV", "mma");
      if (dkdv_sm90_applies(p, kD) && !mma_dkdv && device_runs_sm90a()) {
        err = launch_dkdv_sm90<kDType, kD>(p, stream);
        done = true;
      }
    }
#endif
    if (!done) err = launch_dkdv<kDType, kD>(p, stream);
  }
  if (err != cudaSuccess || !run_dq) return err;
#ifdef BSATTN_WITH_SM90
  {
    // dq on wgmma where a tile has 64 or 128 packed rows; BSATTN_BWD_DQ=mma: the mma.sync kernel (A / B; read once)
    static const bool mma_dq = env_equals("BSATTN_BWD_DQ", "mma");
    if (dq_sm90_applies(p) && !mma_dq && device_runs_sm90a())
      return launch_dq_sm90<kDType, kD>(p, stream);
  }
#endif
  return launch_dq<kDType, kD>(p, stream);
}

template cudaError_t launch_bwd<kBF16, 64>(const Params&, cudaStream_t, bool, bool);
template cudaError_t launch_bwd<kBF16, 128>(const Params&, cudaStream_t, bool, bool);
template cudaError_t launch_bwd<kBF16, 256>(const Params&, cudaStream_t, bool, bool);
template cudaError_t launch_bwd<kF16, 64>(const Params&, cudaStream_t, bool, bool);
template cudaError_t launch_bwd<kF16, 128>(const Params&, cudaStream_t, bool, bool);
template cudaError_t launch_bwd<kF16, 256>(const Params&, cudaStream_t, bool, bool);

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
