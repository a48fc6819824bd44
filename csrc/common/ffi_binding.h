// The FFI signature of the kernels (csrc/README.md), written once for every platform: each handler file
// starts its binding (with or without a stream context) and passes it through these.
#pragma once

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace bsattn {

// The attributes every kernel takes, names and types exact.
template <typename Binding>
auto bind_attributes(Binding&& b) {  // Binding's builder methods are &&-qualified
  return std::move(b).template Attr<int64_t>("block_r")
      .template Attr<int64_t>("block_c")
      .template Attr<float>("scale")
      .template Attr<float>("softcap")
      .template Attr<bool>("causal");
}

// Forward: q, k, v, indptr, indices, kv_lens, q_offset -> o, lse; kv_lens is [B] int32 (per-sequence key lengths) or
// empty (none: every batch element has N keys), q_offset [B] int32 (causal: the key position of each sequence's query
// row 0) or empty (none: N - M). With kWorkspace (CUDA) also a flat u32 workspace result, empty or sized by
// the caller (the sweep kernel's bit maps, csrc/README.md).
template <bool kWorkspace = false, typename Binding>
auto bind_forward(Binding&& b) {
  namespace ffi = xla::ffi;
  auto r = std::move(b).template Arg<ffi::AnyBuffer>()         // q
               .template Arg<ffi::AnyBuffer>()                 // k
               .template Arg<ffi::AnyBuffer>()                 // v
               .template Arg<ffi::Buffer<ffi::S32>>()          // indptr
               .template Arg<ffi::Buffer<ffi::S32>>()          // indices
               .template Arg<ffi::Buffer<ffi::S32>>()          // kv_lens
               .template Arg<ffi::Buffer<ffi::S32>>()          // q_offset
               .template Ret<ffi::AnyBuffer>()                 // o
               .template Ret<ffi::Buffer<ffi::F32>>();         // lse
  if constexpr (kWorkspace)
    return bind_attributes(std::move(r).template Ret<ffi::Buffer<ffi::U32>>());  // workspace
  else
    return bind_attributes(std::move(r));
}

}  // namespace bsattn
