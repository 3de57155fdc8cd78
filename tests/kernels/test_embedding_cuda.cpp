// The CUDA embedding lookup against the row copy of the CPU backend: every output element is the bf16
// table entry widened to fp32, which is exact, so the comparison is bit for bit.
#include <cstdint>
#include <random>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cuda/embedding.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::random_bf16;

TEST_CASE("CUDA embedding forward copies the token rows exactly") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  const int64_t vocab = 1001;
  // dim % 8 == 0 takes the 16-byte path, the others the scalar one.
  for (const int64_t dim : {1, 7, 8, 33, 768, 2560}) {
    for (const int64_t rows : {1, 5, 300}) {
      INFO("seed " << seed << ", rows " << rows << ", dim " << dim);
      const testing::Bf16Values table = random_bf16(vocab * dim, rng);
      std::uniform_int_distribution<int32_t> token_dist(0, vocab - 1);
      std::vector<int32_t> tokens(rows);
      for (int32_t& t : tokens) t = token_dist(rng);
      tokens.front() = vocab - 1;  // the last row of the table
      if (rows > 1) tokens.back() = 0;

      DeviceBuffer<int32_t> d_tokens(tokens);
      DeviceBuffer<uint16_t> d_table(table.bits);
      DeviceBuffer<float> d_out(rows * dim);
      cuda::embedding_forward(d_tokens.get(), rows, d_table.get(), dim, d_out.get(), nullptr);

      const std::vector<float> out = d_out.download();
      int64_t mismatches = 0;  // a NaN left from the poison counts too
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < dim; ++d)
          mismatches += out[r * dim + d] != bf16_to_float(table.bits[tokens[r] * dim + d]);
      }
      CHECK(mismatches == 0);
    }
  }
}
