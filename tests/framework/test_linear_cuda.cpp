// The CUDA backend's NF4 linear layer with its LoRA path against the CPU backend in double, through
// Backend::linear_forward / linear_backward on the same NF4 weight and adapters. Both placements of h
// are checked on the device: in x's spare columns (h_in_x_columns, where shapes allow the up-projection
// folded into the base GEMM: y = [x | h] · [W | scale·B]ᵀ) and in a buffer of its own (two GEMMs); with
// and without dropout; shapes that fold (in % 16 == 0, rank % 8 == 0) and shapes that do not.
#include <cstdint>
#include <random>
#include <vector>

#include "framework/cpu_backend.h"
#include "framework/cuda_backend.h"
#include "framework/dtype.h"
#include "kernels/cpu/nf4.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"

using namespace ssmtune;

namespace {

struct Shape {
  int64_t rows, in, out, rank;
};

// One backend's copy of the layer: the NF4 weight quantized by that backend from the same fp32 values
// (byte-identical on both: tests/kernels/test_nf4_cuda.cpp) and the adapters in its master dtype.
class Layer {
 public:
  Layer(Backend& backend, const Shape& s, const std::vector<float>& weight, const std::vector<double>& A,
        const std::vector<double>& B, double scale, double dropout)
      : backend_(backend) {
    const cpu::Nf4Sizes sizes = cpu::nf4_sizes(s.out * s.in);
    weight_.out_features = s.out;
    weight_.in_features = s.in;
    auto* packed = static_cast<uint8_t*>(keep(sizes.packed_bytes));
    auto* codes = static_cast<uint8_t*>(keep(sizes.blocks));
    auto* nested = static_cast<float*>(keep(sizes.nested_blocks * sizeof(float)));
    backend.nf4_quantize(weight.data(), s.out * s.in, packed, codes, nested, &weight_.nested_offset);
    weight_.packed = packed;
    weight_.absmax_codes = codes;
    weight_.nested_absmax = nested;
    lora_.rank = s.rank;
    lora_.scale = scale;
    lora_.dropout = dropout;
    lora_.dropout_seed = 5;
    lora_.dropout_stream = 11;
    lora_.A = upload(A, backend.master_dtype());
    lora_.B = upload(B, backend.master_dtype());
    lora_.A_act = act_copy(lora_.A, A.size());
    lora_.B_act = act_copy(lora_.B, B.size());
    lora_.dA = upload(std::vector<double>(A.size(), 0.0), backend.master_dtype());
    lora_.dB = upload(std::vector<double>(B.size(), 0.0), backend.master_dtype());
  }
  ~Layer() {
    for (void* p : buffers_) backend_.release(p);
  }
  LinearOp op(bool h_in_x_columns) const { return {&weight_, &lora_, h_in_x_columns}; }
  const LoraPath& lora() const { return lora_; }

  void* keep(size_t bytes) { return buffers_.emplace_back(backend_.allocate(bytes)); }
  void* upload(const std::vector<double>& values, DType dtype) {
    std::vector<std::byte> encoded(values.size() * dtype_size(dtype));
    convert_from_double(values.data(), values.size(), dtype, encoded.data());
    void* p = keep(encoded.size());
    backend_.copy_from_host(p, encoded.data(), encoded.size());
    return p;
  }
  // As LoraAdapters::refresh_act_params makes it.
  const void* act_copy(const void* master, size_t n) {
    if (backend_.act_dtype() == backend_.master_dtype()) return master;
    void* act = keep(n * dtype_size(backend_.act_dtype()));
    backend_.master_to_act(master, act, static_cast<int64_t>(n));
    return act;
  }
  std::vector<double> download(const void* p, size_t n, DType dtype) {
    std::vector<std::byte> encoded(n * dtype_size(dtype));
    backend_.copy_to_host(encoded.data(), p, encoded.size());
    std::vector<double> values(n);
    convert_to_double(dtype, encoded.data(), n, values.data());
    return values;
  }

 private:
  Backend& backend_;
  Nf4Weight weight_;
  LoraPath lora_;
  std::vector<void*> buffers_;
};

std::vector<double> random_values(size_t n, std::mt19937_64& rng, double scale) {
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<double> v(n);
  for (double& x : v) x = u(rng);
  return v;
}

// The values bf16 can hold, so that both backends start from the same inputs.
std::vector<double> bf16_rounded(std::vector<double> v) {
  std::vector<uint16_t> bits(v.size());
  convert_from_double(v.data(), v.size(), DType::BF16, bits.data());
  convert_to_double(DType::BF16, bits.data(), v.size(), v.data());
  return v;
}

// Columns [first, first + width) of each row of a [rows, ld] matrix.
std::vector<double> columns(const std::vector<double>& m, int64_t rows, int64_t ld, int64_t first, int64_t width) {
  std::vector<double> out;
  for (int64_t r = 0; r < rows; ++r) out.insert(out.end(), m.begin() + r * ld + first, m.begin() + r * ld + first + width);
  return out;
}

void check_layer(const Shape& s, double dropout, bool h_in_x_columns, std::mt19937_64& rng) {
  INFO("rows " << s.rows << " in " << s.in << " out " << s.out << " rank " << s.rank << " dropout " << dropout
               << " h in x columns " << h_in_x_columns);
  const std::vector<double> w64 = random_values(static_cast<size_t>(s.out * s.in), rng, 0.05);
  const std::vector<float> weight(w64.begin(), w64.end());
  const std::vector<double> A = random_values(static_cast<size_t>(s.rank * s.in), rng, 0.1);
  const std::vector<double> B = random_values(static_cast<size_t>(s.out * s.rank), rng, 0.1);  // not PEFT's 0
  const std::vector<double> x = bf16_rounded(random_values(static_cast<size_t>(s.rows * s.in), rng, 1.0));
  const std::vector<double> dy = bf16_rounded(random_values(static_cast<size_t>(s.rows * s.out), rng, 1.0));
  const double scale = 2.0;

  // Reference: the CPU backend in double, h in a buffer of its own.
  const std::unique_ptr<Backend> cpu = make_cpu_backend(DType::F64);
  Layer ref(*cpu, s, weight, A, B, scale, dropout);
  const DType f64 = DType::F64;
  void* x_ref = ref.upload(x, f64);
  void* h_ref = ref.keep(s.rows * s.rank * 8);
  void* y_ref = ref.keep(s.rows * s.out * 8);
  void* dy_ref = ref.upload(dy, f64);
  void* dx_ref = ref.keep(s.rows * s.in * 8);
  std::vector<std::array<int64_t, 2>> shapes{{s.out, s.in}};
  void* ws_ref = ref.keep(cpu->linear_workspace_bytes(shapes, s.rows, s.rank, dropout > 0));
  cpu->linear_forward(ref.op(false), x_ref, s.in, s.rows, y_ref, s.out, h_ref, ws_ref);
  cpu->linear_backward(ref.op(false), x_ref, s.in, s.rows, dy_ref, s.out, h_ref, dx_ref, s.in, false, ws_ref);

  // The device: x with h's columns after it when h_in_x_columns, every output poisoned.
  const std::unique_ptr<Backend> gpu = make_cuda_backend();
  Layer dev(*gpu, s, weight, A, B, scale, dropout);
  const DType bf16 = DType::BF16;
  const int64_t ldx = h_in_x_columns ? s.in + lora_h_columns(s.rank) : s.in;
  std::vector<double> x_padded(static_cast<size_t>(s.rows * ldx), 0.0);
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t i = 0; i < s.in; ++i) x_padded[r * ldx + i] = x[r * s.in + i];
  void* x_dev = dev.upload(x_padded, bf16);
  void* h_dev = dev.keep(s.rows * s.rank * 2);
  void* y_dev = dev.keep(s.rows * s.out * 2);
  void* dy_dev = dev.upload(dy, bf16);
  void* dx_dev = dev.keep(s.rows * s.in * 2);
  void* ws_dev = dev.keep(gpu->linear_workspace_bytes(shapes, s.rows, s.rank, dropout > 0));
  for (const auto& [p, bytes] : {std::pair{h_dev, s.rows * s.rank * 2}, {y_dev, s.rows * s.out * 2}, {dx_dev, s.rows * s.in * 2}})
    REQUIRE(cudaMemset(p, 0xFF, static_cast<size_t>(bytes)) == cudaSuccess);  // bf16 NaN
  if (h_in_x_columns)
    REQUIRE(cudaMemset2D(static_cast<uint16_t*>(x_dev) + s.in, ldx * 2, 0xFF, s.rank * 2, s.rows) == cudaSuccess);
  gpu->linear_forward(dev.op(h_in_x_columns), x_dev, ldx, s.rows, y_dev, s.out, h_dev, ws_dev);
  gpu->linear_backward(dev.op(h_in_x_columns), x_dev, ldx, s.rows, dy_dev, s.out, h_dev, dx_dev, s.in, false, ws_dev);
  gpu->synchronize();

  // Tolerances (||dev - ref|| / ||ref||): the device rounds the dequantized weight, A, B (or scale·B) and
  // dropout(x) to bf16 (2^-9 relative each) and h, y, dx on output (2^-9 again), accumulating in fp32:
  // a few 1e-3 together; 1e-2. A wrong transpose, column or mask gives O(1), an unwritten element NaN.
  const double tolerance = 1e-2;
  const std::vector<double> x_after = dev.download(x_dev, x_padded.size(), bf16);
  CHECK(columns(x_after, s.rows, ldx, 0, s.in) == x);  // x itself is only read
  const std::vector<double> h = h_in_x_columns ? columns(x_after, s.rows, ldx, s.in, s.rank)
                                               : dev.download(h_dev, s.rows * s.rank, bf16);
  CHECK(testing::relative_error(h, ref.download(h_ref, s.rows * s.rank, f64)) < tolerance);
  CHECK(testing::relative_error(dev.download(y_dev, s.rows * s.out, bf16), ref.download(y_ref, s.rows * s.out, f64)) <
        tolerance);
  CHECK(testing::relative_error(dev.download(dx_dev, s.rows * s.in, bf16), ref.download(dx_ref, s.rows * s.in, f64)) <
        tolerance);
  const DType f32 = DType::F32;
  CHECK(testing::relative_error(dev.download(dev.lora().dA, A.size(), f32), ref.download(ref.lora().dA, A.size(), f64)) <
        tolerance);
  CHECK(testing::relative_error(dev.download(dev.lora().dB, B.size(), f32), ref.download(ref.lora().dB, B.size(), f64)) <
        tolerance);
}

}  // namespace

TEST_CASE("CUDA NF4 linear with LoRA equals the CPU backend, h in x's columns or apart") {
  const uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Folding shapes (in % 16 == 0, rank % 8 == 0), then ones that take the two-GEMM path: in = 40, rank 4.
  for (const Shape& s : {Shape{37, 64, 96, 8}, Shape{200, 128, 48, 16}, Shape{33, 40, 64, 8}, Shape{50, 64, 80, 4}})
    for (const double dropout : {0.0, 0.2})
      for (const bool h_in_x_columns : {true, false}) check_layer(s, dropout, h_in_x_columns, rng);
}
