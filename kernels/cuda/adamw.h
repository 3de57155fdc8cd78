// AdamW and the reductions of global-norm clipping on the GPU: the CUDA counterpart of
// kernels/cpu/adamw.h, whose header has the math. All adapter tensors live in one flat fp32 buffer
// (framework/lora.h), so one launch updates them all.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ssmtune::cuda {

void adamw_update(float* params, const float* grads, float* m, float* v, int64_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, double bias_correction1, double bias_correction2,
                  void* stream);

// Scratch (device) for sum_of_squares: partial sums of a fixed grid.
size_t sum_of_squares_workspace_bytes(int64_t n);
// Summed in double over a fixed grid in a fixed order (the same result on every run); synchronises the
// stream to return it.
double sum_of_squares(const float* x, int64_t n, void* workspace, void* stream);

void scale(float* x, int64_t n, double factor, void* stream);

}  // namespace ssmtune::cuda
