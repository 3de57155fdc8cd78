// The NF4 linear layer as the training step runs it (framework/cuda_backend.cpp's linear_forward and
// linear_backward): dequantize the frozen weight into a bf16 workspace beside scale·B and one GEMM of
// [x | h] with it (the LoRA path, r = 16, inside the base GEMM), against the former two-GEMM forward.
// mamba-1.4b's in_proj, [8192, 2048], over 4 x 2048 tokens. The adapters' bf16 copies are made once, as the
// step makes them once per pass for all layers, outside the timed calls.
// FLOP-bound: the base GEMM dominates; the LoRA GEMMs are counted, the dequantization is not.
#include <fmt/format.h>

#include "kernels/cpu/nf4.h"
#include "kernels/cuda/lora.h"
#include "kernels/cuda/nf4.h"
#include "recipes/bench/entries.h"

namespace ssmtune::bench {

void bench_nf4_linear(KernelBench& bench) {
  const cpu::LoraDims d{4 * 2048, 2048, 8192, 16};
  const std::string shape = fmt::format("1.4b in_proj T{} r{}", d.rows, d.rank);
  bench.attempt("nf4 linear + lora", shape, [&] {
    cuda::nf4_upload_tables();
    const cpu::Nf4Sizes n = cpu::nf4_sizes(d.out * d.in);
    const DeviceBuffer packed = random_bytes(n.packed_bytes, 41), codes = random_bytes(n.blocks, 42);
    const DeviceBuffer nested = random_f32(n.nested_blocks, 0.01f, 0.03f, 43);
    const DeviceBuffer x = random_bf16(d.rows * d.in, -1, 1, 44), dy = random_bf16(d.rows * d.out, -1, 1, 45);
    // B is random rather than PEFT's zeros, so the LoRA path adds real values.
    const DeviceBuffer A = random_f32(d.rank * d.in, -0.02f, 0.02f, 46), B = random_f32(d.out * d.rank, -0.01f, 0.01f, 47);
    DeviceBuffer A16(d.rank * d.in * 2), B16(d.out * d.rank * 2);
    cuda::lora_adapters_to_bf16(A.as<float>(), d.rank * d.in, A16.as<uint16_t>(), bench.stream());
    cuda::lora_adapters_to_bf16(B.as<float>(), d.out * d.rank, B16.as<uint16_t>(), bench.stream());
    // x with the rank columns after its in values where the fused forward keeps h (framework/backend.h).
    const int64_t k = d.in + d.rank;
    const DeviceBuffer x_ext = random_bf16(d.rows * k, -1, 1, 48);
    DeviceBuffer weight(d.out * k * 2), y(d.rows * d.out * 2), h(d.rows * d.rank * 2), dx(d.rows * d.in * 2);
    DeviceBuffer dA(d.rank * d.in * 4), dB(d.out * d.rank * 4), workspace(cuda::lora_workspace_bytes(d, false));
    const float scale = 32.0f / 16.0f;
    const cpu::LoraDropout no_dropout{};
    auto dequantize = [&] {
      cuda::nf4_dequantize_bf16(packed.as<uint8_t>(), codes.as<uint8_t>(), nested.as<float>(), 0.02f, n.numel,
                                weight.as<uint16_t>(), bench.stream());
    };
    // As linear_forward runs it: y = [x | h] · [W | scale·B]ᵀ in one GEMM.
    auto forward = [&] {
      uint16_t* w_ext = weight.as<uint16_t>();
      cuda::nf4_dequantize_bf16_rows(packed.as<uint8_t>(), codes.as<uint8_t>(), nested.as<float>(), 0.02f, d.out,
                                     d.in, k, w_ext, bench.stream());
      cuda::lora_scaled_up_weight(d, B.as<float>(), scale, w_ext + d.in, k, bench.stream());
      uint16_t* xk = const_cast<uint16_t*>(x_ext.as<uint16_t>());
      cuda::lora_down_projection(bench.gemm(), d, xk, k, A16.as<uint16_t>(), no_dropout, xk + d.in, k, workspace.as<void>());
      bench.gemm().run(false, true, d.rows, d.out, k, 1.0f, xk, k, w_ext, k, 0.0f, y.as<void>(), cuda::GemmOut::bf16,
                       d.out);
    };
    // The path it replaced, for comparison: the base GEMM, then the up-projection accumulated into y.
    auto forward_two_gemms = [&] {
      dequantize();
      bench.gemm().run(false, true, d.rows, d.out, d.in, 1.0f, x.as<uint16_t>(), d.in, weight.as<uint16_t>(), d.in,
                       0.0f, y.as<void>(), cuda::GemmOut::bf16, d.out);
      cuda::lora_forward(bench.gemm(), d, x.as<uint16_t>(), d.in, A16.as<uint16_t>(), B16.as<uint16_t>(), scale,
                         no_dropout,
                         h.as<uint16_t>(), d.rank, y.as<uint16_t>(), d.out, workspace.as<void>());
    };
    auto backward = [&] {
      dequantize();
      bench.gemm().run(false, false, d.rows, d.in, d.out, 1.0f, dy.as<uint16_t>(), d.out, weight.as<uint16_t>(), d.in,
                       0.0f, dx.as<void>(), cuda::GemmOut::bf16, d.in);
      cuda::lora_backward(bench.gemm(), d, x.as<uint16_t>(), d.in, A16.as<uint16_t>(), B16.as<uint16_t>(), scale,
                          no_dropout,
                          h.as<uint16_t>(), d.rank, dy.as<uint16_t>(), d.out, dA.as<float>(), dB.as<float>(),
                          dx.as<uint16_t>(), d.in, workspace.as<void>());
    };
    const double base = 2.0 * d.rows * d.in * d.out, lora = 2.0 * d.rows * d.rank * (d.in + d.out);
    // Backward: dx through W (the base is frozen: no weight gradient), then dB, dh, dA and dx through
    // the adapters, four LoRA-sized GEMMs.
    bench.record("nf4 linear+lora fwd", shape, Bound::flops, base + lora, {}, forward);
    bench.record("nf4 linear+lora fwd 2 GEMMs", shape, Bound::flops, base + lora, {}, forward_two_gemms);
    bench.record("nf4 linear+lora bwd", shape, Bound::flops, base + 2 * lora, {}, backward);
  });
}

}  // namespace ssmtune::bench
