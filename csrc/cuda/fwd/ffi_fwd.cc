// XLA FFI handler `bsattn_fwd_cuda` (contract: csrc/README.md): checks shapes, fills FwdParams and
// launches the forward kernel on XLA's stream. No host sync, no allocation, no device reads: the launch
// depends on shapes and attributes only, so the handler is command-buffer (CUDA graph) compatible. Its third
// result is a u32 workspace (the sweep kernel's bit maps or the row split's area, fwd/params.h fwd_workspace_words),
// empty or sized by jax_bsattn/lowering.py.
#include <cmath>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "common/ffi_binding.h"
#include "common/bsattn_common.h"
#include "cuda/ffi_common.h"
#include "cuda/fwd/params.h"
#include "cuda/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace bsattn {
namespace cuda {
namespace {

using ffi_common::dims_str;
using ffi_common::same_dims;

constexpr char kName[] = "bsattn_fwd_cuda";

ffi::Error bad(const std::string& msg) { return ffi_common::invalid(kName, msg); }

ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> kv_lens,
                   ffi::Buffer<ffi::S32> q_offset, ffi::Result<ffi::AnyBuffer> o,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::U32>> ws, int64_t block_r,
                   int64_t block_c, float scale, float softcap, bool causal) {
  const auto dt = q.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16) return bad("q must be bf16 or f16");
  if (k.element_type() != dt || v.element_type() != dt || o->element_type() != dt)
    return bad("q, k, v and o must share one dtype");
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = o->dimensions();
  const auto pd = indptr.dimensions(), id = indices.dimensions(), ld = lse->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4)
    return bad("q, k, v, o must be rank 4 ([B, M, H, D])");
  if (pd.size() != 3 || id.size() != 3 || ld.size() != 3) return bad("indptr, indices and lse must be rank 3");
  const int64_t B = qd[0], M = qd[1], Hq = qd[2], D = qd[3];
  const int64_t N = kd[1], Hk = kd[2];
  if (kd[0] != B || kd[3] != D) return bad("k " + dims_str(kd) + " does not match q " + dims_str(qd));
  if (!same_dims(vd, kd)) return bad("v " + dims_str(vd) + " must have k's shape " + dims_str(kd));
  if (!same_dims(od, qd)) return bad("o " + dims_str(od) + " must have q's shape " + dims_str(qd));
  if (ld[0] != B || ld[1] != M || ld[2] != Hq) return bad("lse " + dims_str(ld) + " must be [B, M, Hq]");
  if (ws->dimensions().size() != 1) return bad("workspace " + dims_str(ws->dimensions()) + " must be flat");
  const int32_t *lens_data = nullptr, *offset_data = nullptr;
  std::string msg = ffi_common::per_sequence("kv_lens", kv_lens, B, &lens_data);
  if (msg.empty()) msg = ffi_common::per_sequence("q_offset", q_offset, B, &offset_data);
  if (!msg.empty()) return bad(msg);
  msg = ffi_common::check_head_dim(D);
  if (!msg.empty()) return bad(msg);
  if (Hk < 1 || Hq % Hk != 0) return bad("Hq must be a positive multiple of Hk");
  ffi_common::Layout l;
  msg = ffi_common::check_layout(pd, id, B, M, N, Hk, block_r, block_c, l);
  if (!msg.empty()) return bad(msg);
  if (B == 0 || M == 0 || Hq == 0) return ffi::Error::Success();

  msg = ffi_common::check_int32_limits(B, M, N, Hq, Hk, D, block_r, block_c, l, /*backward=*/false);
  if (!msg.empty()) return bad(msg);

  FwdParams p{};
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.indptr = indptr.typed_data();
  p.indices = indices.typed_data();
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  p.kv_lens = lens_data;
  ffi_common::fill_problem(p, B, M, N, Hq, Hk, block_r, block_c, l, causal, scale, softcap);
  p.q_offset = offset_data;
  // the workspace: empty, or exactly fwd_workspace_words (the lowering's size; used where the sweep or the split runs)
  p.ws_words = static_cast<int64_t>(ws->element_count());
  const int64_t ws_words = fwd_workspace_words(p, static_cast<int>(D));
  if (p.ws_words != 0 && p.ws_words != ws_words)
    return bad("workspace " + dims_str(ws->dimensions()) + " must be empty or hold " + std::to_string(ws_words) +
               " words (jax_bsattn/lowering.py _fwd_workspace_words)");
  p.ws = p.ws_words != 0 ? ws->typed_data() : nullptr;
  p.sweep_table = nullptr;
  p.split_items = p.split_heads = nullptr;
  p.split_sums = nullptr;
  p.split_slots = p.split_parts = 0;

  cudaError_t err = cudaSuccess;
  const bool bf16 = dt == ffi::DataType::BF16;
  switch (D) {
    case 64:
      err = bf16 ? launch_fwd<kBF16, 64>(p, stream) : launch_fwd<kF16, 64>(p, stream);
      break;
    case 128:
      err = bf16 ? launch_fwd<kBF16, 128>(p, stream) : launch_fwd<kF16, 128>(p, stream);
      break;
    default:
      err = bf16 ? launch_fwd<kBF16, 256>(p, stream) : launch_fwd<kF16, 256>(p, stream);
      break;
  }
  return ffi_common::launch_result(kName, err);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kBsattnFwdCuda, FwdImpl,
                       bind_forward<true>(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_Handler* fwd_handler() { return kBsattnFwdCuda; }

}  // namespace cuda
}  // namespace bsattn
