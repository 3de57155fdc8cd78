// Embedding lookup on the GPU: out[r] (fp32, the residual stream) = table[tokens[r]] (bf16).
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

void embedding_forward(const int32_t* tokens, int64_t rows, const uint16_t* table, int64_t dim, float* out,
                       void* stream);

}  // namespace ssmtune::cuda
