// XLA FFI handler `bsattn_bwd_cuda` (contract: csrc/README.md): checks shapes, fills bwd::Params and launches
// the backward on XLA's stream (bwd/dispatch.cu): on an H100 / H200 with a dq_accum workspace, the one-pass Hopper
// kernel (dq by float atomic adds: dk, dv deterministic, dq not); otherwise the dq kernel and the dk / dv kernel
// (two passes at head dim 256), which use no float atomics and are bitwise deterministic. No host sync, no
// allocation, no device reads: the launches depend on shapes and attributes only, so the handler is command-
// buffer (CUDA graph) compatible.
//
// Operands: q, k, v, do, lse, delta, indptr, indices, kv_lens (s32 [B], or empty: N keys each), q_offset (s32 [B], or
// empty: causal anchored at N - M), col_indptr, col_rows, col_order (the column view of the
// layout and its columns by decreasing length, jax_bsattn/column_view.py; all three [LB, LH, 0] where the row-oriented
// backward runs, which never reads them); results dq, dk, dv, dq_accum (a flat float32 workspace: empty, the
// deterministic pair with no split; q's size + kDqSchedWords or more, the one-pass kernels' or the row-oriented one's;
// or exactly the pair's split areas, bwd/params.h pair_areas).
#include <cstdint>
#include <cstdlib>
#include <string>

#include <cuda_runtime.h>

#include "common/ffi_binding.h"
#include "cuda/bwd/params.h"
#include "cuda/ffi_common.h"
#include "cuda/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace bsattn {
namespace cuda {
namespace {

using ffi_common::dims_str;
using ffi_common::same_dims;

constexpr char kBwdName[] = "bsattn_bwd_cuda";

ffi::Error bwd_bad(const std::string& msg) { return ffi_common::invalid(kBwdName, msg); }

template <int kDType>
cudaError_t launch_all(const bwd::Params& p, int64_t D, bool run_dq, bool run_dkdv, cudaStream_t stream) {
  switch (D) {
    case 64:
      return bwd::launch_bwd<kDType, 64>(p, stream, run_dq, run_dkdv);
    case 128:
      return bwd::launch_bwd<kDType, 128>(p, stream, run_dq, run_dkdv);
    default:
      return bwd::launch_bwd<kDType, 256>(p, stream, run_dq, run_dkdv);
  }
}

ffi::Error BwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer dout,
                   ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> indptr,
                   ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> q_offset,
                   ffi::Buffer<ffi::S32> col_indptr,
                   ffi::Buffer<ffi::S32> col_rows,
                   ffi::Buffer<ffi::S32> col_order,
                   ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                   ffi::Result<ffi::Buffer<ffi::F32>> dq_accum, int64_t block_r, int64_t block_c, float scale, float softcap, bool causal) {
  const auto dt = q.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16) return bwd_bad("q must be bf16 or f16");
  if (k.element_type() != dt || v.element_type() != dt || dout.element_type() != dt || dq->element_type() != dt ||
      dk->element_type() != dt || dv->element_type() != dt)
    return bwd_bad("q, k, v, do, dq, dk and dv must share one dtype");
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), dod = dout.dimensions();
  const auto dqd = dq->dimensions(), dkd = dk->dimensions(), dvd = dv->dimensions();
  const auto ld = lse.dimensions(), dld = delta.dimensions();
  const auto pd = indptr.dimensions(), id = indices.dimensions(), cpd = col_indptr.dimensions(),
             crd = col_rows.dimensions(), cod = col_order.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return bwd_bad("q and k must be rank 4 ([B, M, H, D])");
  if (ld.size() != 3 || dld.size() != 3) return bwd_bad("lse and delta must be rank 3 ([B, M, Hq])");
  if (pd.size() != 3 || id.size() != 3 || cpd.size() != 3 || crd.size() != 3 || cod.size() != 3)
    return bwd_bad("indptr, indices, col_indptr, col_rows and col_order must be rank 3");
  const int64_t B = qd[0], M = qd[1], Hq = qd[2], D = qd[3];
  const int64_t N = kd[1], Hk = kd[2];
  if (kd[0] != B || kd[3] != D) return bwd_bad("k " + dims_str(kd) + " does not match q " + dims_str(qd));
  if (!same_dims(vd, kd)) return bwd_bad("v " + dims_str(vd) + " must have k's shape " + dims_str(kd));
  if (!same_dims(dod, qd)) return bwd_bad("do " + dims_str(dod) + " must have q's shape " + dims_str(qd));
  if (!same_dims(dqd, qd)) return bwd_bad("dq " + dims_str(dqd) + " must have q's shape " + dims_str(qd));
  if (!same_dims(dkd, kd) || !same_dims(dvd, kd))
    return bwd_bad("dk " + dims_str(dkd) + " and dv " + dims_str(dvd) + " must have k's shape " +
                   dims_str(kd));
  if (ld[0] != B || ld[1] != M || ld[2] != Hq) return bwd_bad("lse " + dims_str(ld) + " must be [B, M, Hq]");
  const int64_t nacc = static_cast<int64_t>(dq_accum->element_count());
  const int64_t nq = static_cast<int64_t>(q.element_count());
  if (nacc != 0 && dq_accum->dimensions().size() != 1)
    return bwd_bad("dq_accum " + dims_str(dq_accum->dimensions()) + " must be empty or flat");
  if (!same_dims(dld, ld)) return bwd_bad("delta " + dims_str(dld) + " must be [B, M, Hq]");
  const int32_t *lens_data = nullptr, *offset_data = nullptr;
  std::string msg = ffi_common::per_sequence("kv_lens", kv_lens, B, &lens_data);
  if (msg.empty()) msg = ffi_common::per_sequence("q_offset", q_offset, B, &offset_data);
  if (msg.empty()) msg = ffi_common::check_head_dim(D);
  if (!msg.empty()) return bwd_bad(msg);
  if (Hk < 1 || Hq % Hk != 0) return bwd_bad("Hq must be a multiple of Hk >= 1");
  ffi_common::Layout l;
  msg = ffi_common::check_layout(pd, id, B, M, N, Hk, block_r, block_c, l);
  if (!msg.empty()) return bwd_bad(msg);
  const int64_t NB = l.NB, LB = l.LB, LH = l.LH, nnz = l.nnz;
  // the column view [LB, LH, ...], or none (all three last dims 0) where the row-oriented backward runs (checked
  // below)
  for (const auto& [name, d] : {std::pair{"col_indptr", cpd}, {"col_rows", crd}, {"col_order", cod}})
    if (d[0] != LB || d[1] != LH)
      return bwd_bad(std::string(name) + " " + dims_str(d) + " must be [LB, LH, ...] like indptr");
  const bool no_col_view = cpd[2] == 0 && crd[2] == 0 && cod[2] == 0;
  if (!no_col_view) {
    if (cpd[2] != NB + 1) return bwd_bad("col_indptr " + dims_str(cpd) + " must be [LB, LH, ceil(N / C) + 1]");
    if (crd[2] != nnz) return bwd_bad("col_rows " + dims_str(crd) + " must be [LB, LH, nnz] like indices");
    if (cod[2] != NB) return bwd_bad("col_order " + dims_str(cod) + " must be [LB, LH, ceil(N / C)]");
  }

  bool run_dq = B > 0 && M > 0 && Hq > 0;  // dq has elements
  bool run_dkdv = B > 0 && N > 0;          // dk / dv have elements (zeros when no query sees them)
#ifdef BSATTN_BWD_DEV
  // Development builds only (dev/build_dev.sh): BSATTN_BWD_PARTS=dq or dkdv runs one kernel, to time them apart.
  if (const char* parts = std::getenv("BSATTN_BWD_PARTS")) {
    const std::string s(parts);
    if (s == "dq") run_dkdv = false;
    if (s == "dkdv") run_dq = false;
  }
#endif
  if (!run_dq && !run_dkdv) return ffi::Error::Success();

  msg = ffi_common::check_int32_limits(B, M, N, Hq, Hk, D, block_r, block_c, l, /*backward=*/true);
  if (!msg.empty()) return bwd_bad(msg);

  bwd::Params p{};
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.dout = dout.untyped_data();
  p.lse = lse.typed_data();
  p.delta = delta.typed_data();
  p.indptr = indptr.typed_data();
  p.indices = indices.typed_data();
  // (null: no column view, which only the row-oriented backward may run without; checked below)
  p.col_indptr = no_col_view ? nullptr : col_indptr.typed_data();
  p.col_rows = no_col_view ? nullptr : col_rows.typed_data();
  p.col_order = no_col_view ? nullptr : col_order.typed_data();
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.dq_accum = nacc != 0 ? dq_accum->typed_data() : nullptr;
  p.dq_accum_words = nacc;
  ffi_common::fill_problem(p, B, M, N, Hq, Hk, block_r, block_c, l, causal, scale, softcap);
  p.kv_lens = lens_data;
  p.q_offset = offset_data;
  p.scale = scale;
  // the workspace: none, the one-pass kernels' (q's size + the work counter, at least), or the deterministic pair's
  // split areas (exactly the column split's, bwd/column_split.cuh, the dq split's, bwd_sm90/dq_split.cuh, or both)
  if (nacc != 0 && nacc < nq + bwd::kDqSchedWords && !bwd::is_pair_workspace(p, static_cast<int>(D)))
    return bwd_bad("dq_accum " + dims_str(dq_accum->dimensions()) + " must be empty, hold at least q's size + " +
                   std::to_string(bwd::kDqSchedWords) + " elements, or exactly the column split's " +
                   std::to_string(bwd::split_workspace_words(p, static_cast<int>(D))) + ", the dq split's " +
                   std::to_string(bwd::dq_split_words(p, static_cast<int>(D))) + " or their sum");

  // (N > 0: some dk / dv kernel may read the view; run_dkdv is not enough: the development switch above may clear it)
  if (no_col_view && N > 0 && !bwd::runs_rows_sm90(p, static_cast<int>(D), run_dq, run_dkdv))
    return bwd_bad("col_indptr, col_rows and col_order are empty, but the backward that runs here is not the "
                   "row-oriented one and needs the layout's column view (a module lowered for an H100 / H200 run "
                   "on another GPU? jax_bsattn.export(..., gpu=\"portable\") lowers for any GPU)");

  const cudaError_t err = dt == ffi::DataType::BF16 ? launch_all<bwd::kBF16>(p, D, run_dq, run_dkdv, stream)
                                                    : launch_all<bwd::kF16>(p, D, run_dq, run_dkdv, stream);
  return ffi_common::launch_result(kBwdName, err);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kBsattnBwdCuda, BwdImpl,
                       bind_attributes(ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()         // q
                           .Arg<ffi::AnyBuffer>()         // k
                           .Arg<ffi::AnyBuffer>()         // v
                           .Arg<ffi::AnyBuffer>()         // do
                           .Arg<ffi::Buffer<ffi::F32>>()  // lse
                           .Arg<ffi::Buffer<ffi::F32>>()  // delta
                           .Arg<ffi::Buffer<ffi::S32>>()  // indptr
                           .Arg<ffi::Buffer<ffi::S32>>()  // indices
                           .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                           .Arg<ffi::Buffer<ffi::S32>>()  // q_offset
                           .Arg<ffi::Buffer<ffi::S32>>()  // col_indptr
                           .Arg<ffi::Buffer<ffi::S32>>()  // col_rows
                           .Arg<ffi::Buffer<ffi::S32>>()  // col_order
                           .Ret<ffi::AnyBuffer>()         // dq
                           .Ret<ffi::AnyBuffer>()         // dk
                           .Ret<ffi::AnyBuffer>()         // dv
                           .Ret<ffi::Buffer<ffi::F32>>()),  // dq_accum (workspace; empty: deterministic)
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_Handler* bwd_handler() { return kBsattnBwdCuda; }

}  // namespace cuda
}  // namespace bsattn
