// The nanobind module `_bsattn_cpu`: XLA FFI handlers `bsattn_fwd_cpu` / `bsattn_bwd_cpu`
// (contract: csrc/README.md). The handlers check every shape and dtype again (the Python side
// validates first; this is defence in depth), then call the kernels in attention_*_cpu.cc.
#include <cstdint>
#include <exception>
#include <limits>
#include <new>
#include <optional>
#include <string>

#include "common/ffi_binding.h"
#include "cpu/attention_cpu.h"
#include "nanobind/nanobind.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace bsattn::cpu {
namespace {

using Dims = ffi::AnyBuffer::Dimensions;

std::string shape_str(Dims dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

std::string dtype_str(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return "f32";
    case ffi::DataType::BF16:
      return "bf16";
    case ffi::DataType::F16:
      return "f16";
    default:
      return "dtype #" + std::to_string(static_cast<int>(t));
  }
}

bool same_dims(Dims a, std::initializer_list<int64_t> b) {
  if (a.size() != b.size()) return false;
  size_t i = 0;
  for (int64_t d : b)
    if (a[i++] != d) return false;
  return true;
}

std::string dims_str(std::initializer_list<int64_t> b) {
  std::string s = "[";
  for (int64_t d : b) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

// An InvalidArgument error when `dims` is not exactly `want`.
std::optional<ffi::Error> expect_shape(const char* kernel, const char* name, Dims dims,
                                       std::initializer_list<int64_t> want) {
  if (same_dims(dims, want)) return std::nullopt;
  return ffi::Error::InvalidArgument(std::string(kernel) + ": `" + name + "` has shape " +
                                     shape_str(dims) + ", expected " + dims_str(want));
}

std::optional<ffi::Error> expect_dtype(const char* kernel, const char* name, ffi::DataType got,
                                       ffi::DataType want) {
  if (got == want) return std::nullopt;
  return ffi::Error::InvalidArgument(std::string(kernel) + ": `" + name + "` has dtype " +
                                     dtype_str(got) + ", expected " + dtype_str(want) +
                                     " (the dtype of `q`)");
}

// Both checks for a buffer that must match `want` in shape and `dtype` in element type.
std::optional<ffi::Error> expect_buffer(const char* kernel, const char* name,
                                        const ffi::AnyBuffer& buf,
                                        std::initializer_list<int64_t> want, ffi::DataType dtype) {
  if (auto e = expect_shape(kernel, name, buf.dimensions(), want)) return e;
  return expect_dtype(kernel, name, buf.element_type(), dtype);
}

// Fills `in` (problem, dtype, q / k / v, layout) from the operands and attributes, checking
// everything they must satisfy together.
std::optional<ffi::Error> make_inputs(const char* kernel, const ffi::AnyBuffer& q,
                                      const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                                      const ffi::Buffer<ffi::S32>& indptr,
                                      const ffi::Buffer<ffi::S32>& indices, int64_t block_r,
                                      int64_t block_c, float scale, float softcap, bool causal,
                                      AttnInputs* in) {
  Problem* p = &in->p;
  DType* dtype = &in->dtype;
  const std::string kn(kernel);
  auto fail = [&](const std::string& msg) { return ffi::Error::InvalidArgument(kn + ": " + msg); };
  switch (q.element_type()) {
    case ffi::DataType::F32:
      *dtype = DType::kF32;
      break;
    case ffi::DataType::BF16:
      *dtype = DType::kBF16;
      break;
    case ffi::DataType::F16:
      *dtype = DType::kF16;
      break;
    default:
      return fail("`q` has dtype " + dtype_str(q.element_type()) + "; expected f32, bf16 or f16");
  }
  if (auto e = expect_dtype(kernel, "k", k.element_type(), q.element_type())) return e;
  if (auto e = expect_dtype(kernel, "v", v.element_type(), q.element_type())) return e;

  const Dims qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4) return fail("`q` must have rank 4 [B, M, Hq, D], got " + shape_str(qd));
  if (kd.size() != 4) return fail("`k` must have rank 4 [B, N, Hk, D], got " + shape_str(kd));
  p->B = qd[0];
  p->M = qd[1];
  p->Hq = qd[2];
  p->D = qd[3];
  p->N = kd[1];
  p->Hk = kd[2];
  if (kd[0] != p->B || kd[3] != p->D)
    return fail("`k` has shape " + shape_str(kd) + ", incompatible with `q` " + shape_str(qd) +
                " (expected [B, N, Hk, D])");
  if (auto e = expect_shape(kernel, "v", v.dimensions(), {p->B, p->N, p->Hk, p->D})) return e;
  if (p->Hk == 0 ? p->Hq != 0 : p->Hq % p->Hk != 0)
    return fail("the query heads of `q` " + shape_str(qd) +
                " are not a multiple of the KV heads of `k` " + shape_str(kd));

  constexpr int64_t kMaxLen = std::numeric_limits<int32_t>::max();  // keys are int32 in the masks
  if (p->M > kMaxLen || p->N > kMaxLen)
    return fail("sequence lengths M = " + std::to_string(p->M) + ", N = " + std::to_string(p->N) +
                " exceed 2^31 - 1");
  constexpr int64_t kMaxBlock = int64_t{1} << 30;
  if (block_r < 1 || block_r > kMaxBlock || block_c < 1 || block_c > kMaxBlock)
    return fail("block_r = " + std::to_string(block_r) + " and block_c = " +
                std::to_string(block_c) + " must lie in [1, 2^30]");
  p->R = block_r;
  p->C = block_c;
  p->MB = (p->M + p->R - 1) / p->R;
  p->NB = (p->N + p->C - 1) / p->C;
  p->scale = scale;
  p->softcap = softcap > 0.f ? softcap : 0.f;  // NaN or <= 0: no soft cap
  p->causal = causal;

  const Dims ipd = indptr.dimensions(), ixd = indices.dimensions();
  if (ipd.size() != 3 || (ipd[0] != 1 && ipd[0] != p->B) || (ipd[1] != 1 && ipd[1] != p->Hk) ||
      ipd[2] != p->MB + 1)
    return fail("`indptr` has shape " + shape_str(ipd) + ", expected [LB, LH, " +
                std::to_string(p->MB + 1) + "] with LB in {1, " + std::to_string(p->B) +
                "}, LH in {1, " + std::to_string(p->Hk) + "} (MB = ceil(M / block_r) = " +
                std::to_string(p->MB) + ")");
  if (ixd.size() != 3 || ixd[0] != ipd[0] || ixd[1] != ipd[1])
    return fail("`indices` has shape " + shape_str(ixd) + ", expected [" +
                std::to_string(ipd[0]) + ", " + std::to_string(ipd[1]) +
                ", nnz] to match `indptr` " + shape_str(ipd));
  p->LB = ipd[0];
  p->LH = ipd[1];
  p->nnz = ixd[2];
  in->q = q.untyped_data();
  in->k = k.untyped_data();
  in->v = v.untyped_data();
  in->layout = {indptr.typed_data(), indices.typed_data()};
  return std::nullopt;
}

// A per-sequence operand (kv_lens, q_offset): [B], or empty (none: *out = null).
std::optional<ffi::Error> per_sequence(const char* kernel, const char* name, ffi::Buffer<ffi::S32> buf,
                                       const Problem& p, const int32_t** out) {
  const bool has = buf.element_count() != 0;
  if (auto e = expect_shape(kernel, name, buf.dimensions(), {has ? p.B : 0})) return e;
  *out = has ? buf.typed_data() : nullptr;
  return std::nullopt;
}

ffi::Error run_guarded(void (*kernel)(const void*), const void* args, const char* name) {
  try {
    kernel(args);
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal(std::string(name) + ": out of memory for the kernel's scratch");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  } catch (...) {
    return ffi::Error::Internal(std::string(name) + ": unknown error");
  }
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                   ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> q_offset, ffi::Result<ffi::AnyBuffer> o,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse,
                   int64_t block_r, int64_t block_c, float scale, float softcap, bool causal) {
  constexpr const char* kName = "bsattn_fwd_cpu";
  FwdArgs a;
  if (auto e = make_inputs(kName, q, k, v, indptr, indices, block_r, block_c, scale, softcap,
                           causal, &a))
    return std::move(*e);
  const Problem& p = a.p;
  if (auto e = expect_buffer(kName, "o", *o, {p.B, p.M, p.Hq, p.D}, q.element_type()))
    return std::move(*e);
  if (auto e = expect_shape(kName, "lse", lse->dimensions(), {p.B, p.M, p.Hq}))
    return std::move(*e);
  if (auto e = per_sequence(kName, "kv_lens", kv_lens, p, &a.kv_lens)) return std::move(*e);
  if (auto e = per_sequence(kName, "q_offset", q_offset, p, &a.q_offset)) return std::move(*e);
  if (p.Hk == 0) return ffi::Error::Success();  // no heads: every output is empty
  a.o = o->untyped_data();
  a.lse = lse->typed_data();
  return run_guarded([](const void* x) { attention_fwd_cpu(*static_cast<const FwdArgs*>(x)); },
                     &a, kName);
}

ffi::Error BwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer d_o,
                   ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> delta,
                   ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> kv_lens,
                   ffi::Buffer<ffi::S32> q_offset, ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                   ffi::Result<ffi::AnyBuffer> dv, int64_t block_r, int64_t block_c, float scale,
                   float softcap, bool causal) {
  constexpr const char* kName = "bsattn_bwd_cpu";
  BwdArgs a;
  if (auto e = make_inputs(kName, q, k, v, indptr, indices, block_r, block_c, scale, softcap,
                           causal, &a))
    return std::move(*e);
  const Problem& p = a.p;
  const ffi::DataType t = q.element_type();
  const std::initializer_list<int64_t> q_shape = {p.B, p.M, p.Hq, p.D};
  const std::initializer_list<int64_t> kv_shape = {p.B, p.N, p.Hk, p.D};
  const std::initializer_list<int64_t> stat_shape = {p.B, p.M, p.Hq};
  if (auto e = expect_buffer(kName, "do", d_o, q_shape, t)) return std::move(*e);
  if (auto e = expect_shape(kName, "lse", lse.dimensions(), stat_shape)) return std::move(*e);
  if (auto e = expect_shape(kName, "delta", delta.dimensions(), stat_shape)) return std::move(*e);
  if (auto e = expect_buffer(kName, "dq", *dq, q_shape, t)) return std::move(*e);
  if (auto e = expect_buffer(kName, "dk", *dk, kv_shape, t)) return std::move(*e);
  if (auto e = expect_buffer(kName, "dv", *dv, kv_shape, t)) return std::move(*e);
  if (auto e = per_sequence(kName, "kv_lens", kv_lens, p, &a.kv_lens)) return std::move(*e);
  if (auto e = per_sequence(kName, "q_offset", q_offset, p, &a.q_offset)) return std::move(*e);
  if (p.Hk == 0) return ffi::Error::Success();
  a.d_o = d_o.untyped_data();
  a.lse = lse.typed_data();
  a.delta = delta.typed_data();
  a.dq = dq->untyped_data();
  a.dk = dk->untyped_data();
  a.dv = dv->untyped_data();
  return run_guarded([](const void* x) { attention_bwd_cpu(*static_cast<const BwdArgs*>(x)); },
                     &a, kName);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kBsattnFwdCpu, FwdImpl, bind_forward(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER(kBsattnBwdCpu, BwdImpl,
                       bind_attributes(ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()          // q
                           .Arg<ffi::AnyBuffer>()          // k
                           .Arg<ffi::AnyBuffer>()          // v
                           .Arg<ffi::AnyBuffer>()          // do
                           .Arg<ffi::Buffer<ffi::F32>>()   // lse
                           .Arg<ffi::Buffer<ffi::F32>>()   // delta
                           .Arg<ffi::Buffer<ffi::S32>>()   // indptr
                           .Arg<ffi::Buffer<ffi::S32>>()   // indices
                           .Arg<ffi::Buffer<ffi::S32>>()   // kv_lens
                           .Arg<ffi::Buffer<ffi::S32>>()   // q_offset
                           .Ret<ffi::AnyBuffer>()          // dq
                           .Ret<ffi::AnyBuffer>()          // dk
                           .Ret<ffi::AnyBuffer>()));       // dv

}  // namespace bsattn::cpu

NB_MODULE(_bsattn_cpu, m) {
  m.doc() = "jax_bsattn CPU kernels: XLA FFI handlers for block-sparse attention";
  m.def(
      "registrations",
      []() {
        nb::dict d;
        d["bsattn_fwd_cpu"] = nb::capsule(reinterpret_cast<void*>(bsattn::cpu::kBsattnFwdCpu));
        d["bsattn_bwd_cpu"] = nb::capsule(reinterpret_cast<void*>(bsattn::cpu::kBsattnBwdCpu));
        return d;
      },
      "FFI targets of this module: {name: capsule}, for jax.ffi.register_ffi_target(name, "
      "capsule, platform='cpu').");
}
