// The LM head fused with token cross-entropy on the GPU: the CUDA counterpart of
// kernels/cpu/cross_entropy.h, whose header has the math. Slice by slice, the logits of slice_rows rows
// are computed in fp32 by one GEMM, one kernel turns each row into its loss and (when dh is wanted) its
// logit gradient in bf16, and a second GEMM maps that gradient back to dh; the [rows, vocab] logits of
// the whole batch never exist.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/gemm.h"

namespace ssmtune::cuda {

size_t cross_entropy_workspace_bytes(int64_t rows, int64_t slice_rows, int64_t vocab);

// h [rows, dim], W [vocab, dim], weights [rows] and dh [rows, dim] are bf16; targets int32 [rows]; all
// on the device. Rows with weight 0 are excluded as in the CPU reference (their dh rows are zero).
// Returns sum_t weight_t * loss_t, the per-row losses summed in double in row order on the host after
// one synchronisation of the stream. dh may be null for the loss alone.
double cross_entropy_forward_backward(Gemm& gemm, const uint16_t* h, const uint16_t* W, int64_t rows, int64_t dim,
                                      int64_t vocab, const int32_t* targets, const uint16_t* weights,
                                      float grad_scale, uint16_t* dh, void* workspace, int64_t slice_rows);

}  // namespace ssmtune::cuda
