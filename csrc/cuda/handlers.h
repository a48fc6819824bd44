// The XLA FFI handlers of the CUDA module, one file per direction (fwd/ffi_fwd.cc, bwd/...).
#pragma once

#include "xla/ffi/api/c_api.h"

namespace bsattn {
namespace cuda {

XLA_FFI_Handler* fwd_handler();  // "bsattn_fwd_cuda"
XLA_FFI_Handler* bwd_handler();  // "bsattn_bwd_cuda"
bool sm90_kernels_built();       // whether the module holds the Hopper (sm_90a) kernels (bwd/dispatch.cu)

}  // namespace cuda
}  // namespace bsattn
