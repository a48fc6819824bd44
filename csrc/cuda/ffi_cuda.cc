// nanobind module `_bsattn_cuda`: hands the CUDA FFI handlers to Python as capsules,
//   for name, cap in _bsattn_cuda.registrations().items():
//       jax.ffi.register_ffi_target(name, cap, platform="CUDA")
#include <nanobind/nanobind.h>

#include "cuda/handlers.h"

namespace nb = nanobind;

namespace {

nb::capsule encapsulate(XLA_FFI_Handler* fn) { return nb::capsule(reinterpret_cast<void*>(fn)); }

}  // namespace

NB_MODULE(_bsattn_cuda, m) {
  m.doc() = "CUDA kernels of jax_bsattn exposed as XLA FFI handlers";
  m.def("registrations", []() {
    nb::dict d;
    d["bsattn_fwd_cuda"] = encapsulate(bsattn::cuda::fwd_handler());
    d["bsattn_bwd_cuda"] = encapsulate(bsattn::cuda::bwd_handler());
    return d;
  });
  m.def("sm90_kernels", &bsattn::cuda::sm90_kernels_built,
        "Whether the module was built with the Hopper (sm_90a) kernels, which run on H100 / H200 only");
}
