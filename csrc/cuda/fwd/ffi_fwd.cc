// XLA FFI handler `bsattn_fwd_cuda` (contract: csrc/README.md): checks shapes, fills FwdParams and
// launches the forward kernel on XLA's stream. No host sync, no allocation, no device reads: the launch
// depends on shapes and attributes only, so the handler is command-buffer (CUDA graph) compatible.
#include <cmath>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "common/ffi_binding.h"
#include "common/bsattn_common.h"
#include "cuda/fwd/params.h"
#include "cuda/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace bsattn {
namespace cuda {
namespace {

std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error bad(const std::string& msg) { return ffi::Error::InvalidArgument("bsattn_fwd_cuda: " + msg); }

constexpr int64_t kMaxInt = (int64_t{1} << 31) - 1;

ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::AnyBuffer> o,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse, int64_t block_r, int64_t block_c, float scale,
                   float softcap, bool causal) {
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
  for (int i = 0; i < 4; ++i)
    if (vd[i] != kd[i]) return bad("v " + dims_str(vd) + " must have k's shape " + dims_str(kd));
  for (int i = 0; i < 4; ++i)
    if (od[i] != qd[i]) return bad("o " + dims_str(od) + " must have q's shape " + dims_str(qd));
  if (ld[0] != B || ld[1] != M || ld[2] != Hq) return bad("lse " + dims_str(ld) + " must be [B, M, Hq]");
  if (D != 64 && D != 128 && D != 256)
    return bad("head dim " + std::to_string(D) + " is not supported; supported head dims: 64, 128, 256");
  if (Hk < 1 || Hq % Hk != 0) return bad("Hq must be a positive multiple of Hk");
  if (block_r < 1 || block_c < 1) return bad("block_r and block_c must be >= 1");
  const int64_t MB = (M + block_r - 1) / block_r;
  const int64_t NB = (N + block_c - 1) / block_c;
  const int64_t LB = pd[0], LH = pd[1];
  if ((LB != 1 && LB != B) || (LH != 1 && LH != Hk) || pd[2] != MB + 1)
    return bad("indptr " + dims_str(pd) + " must be [1 or B, 1 or Hk, ceil(M / R) + 1]");
  if (id[0] != LB || id[1] != LH) return bad("indices " + dims_str(id) + " must be [LB, LH, nnz] like indptr");
  const int64_t nnz = id[2];
  if (B == 0 || M == 0 || Hq == 0) return ffi::Error::Success();

  const int64_t g = Hq / Hk;
  // 32-bit index arithmetic inside one sequence / head group (tensor offsets are 64-bit)
  const int64_t lim30 = int64_t{1} << 30;
  if (M >= lim30 || N >= lim30 || block_r >= lim30 || block_c >= lim30 || Hq * D >= lim30 ||
      block_r * g > kMaxInt || B * Hk > kMaxInt || nnz > kMaxInt || NB * block_c >= lim30)
    return bad("a dimension is too large for this kernel");

  FwdParams p{};
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.indptr = indptr.typed_data();
  p.indices = indices.typed_data();
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  p.B = static_cast<int>(B);
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.Hq = static_cast<int>(Hq);
  p.Hk = static_cast<int>(Hk);
  p.g = static_cast<int>(g);
  p.R = static_cast<int>(block_r);
  p.C = static_cast<int>(block_c);
  p.MB = static_cast<int>(MB);
  p.NB = static_cast<int>(NB);
  p.LB = static_cast<int>(LB);
  p.LH = static_cast<int>(LH);
  p.nnz = nnz;
  p.causal = causal ? 1 : 0;
  constexpr float kLog2e = 1.4426950408889634f;
  if (softcap > 0.f) {
    p.use_cap = 1;
    p.s_mul = scale / softcap * 2.f * kLog2e;  // tanh is evaluated as 1 - 2 / (1 + 2^(2 log2(e) x))
    p.cap_mul = softcap * kLog2e;
  } else {
    p.use_cap = 0;
    p.s_mul = scale * kLog2e;
    p.cap_mul = 0.f;
  }

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
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("bsattn_fwd_cuda: kernel launch failed: ") + cudaGetErrorName(err) +
                                ": " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kBsattnFwdCuda, FwdImpl,
                       bind_forward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_Handler* fwd_handler() { return kBsattnFwdCuda; }

}  // namespace cuda
}  // namespace bsattn
