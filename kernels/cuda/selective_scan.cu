// Selective scan on the GPU (math: kernels/cpu/selective_scan.h; contract: kernels/cuda/selective_scan.h).
//
// Work split. A thread owns one channel d of one chunk of one sequence and keeps the N = 16 fp32 states
// of that channel in registers; a block holds kChannels consecutive channels of the same (batch, chunk),
// so the per-token loads of u, delta, z, dout are coalesced across a warp and the token's B and C rows,
// the same for every channel, are staged once per block in shared memory and read as broadcasts.
//
// Forward, three launches:
//   local    per chunk, the end state from a zero start (written into chunk_states), and the chunk's
//            sum of delta (softplus(delta + bias), formed per token anyway) into the workspace;
//   carry    per (batch, channel, state), sequentially over chunks:
//            h_end[c] = local[c] + exp(A * sum_{t in c} delta_t) * h_end[c-1], reading those sums (1 MB at
//            the benchmark shape) instead of delta again (34 MB);
//   output   per chunk, the scan again from the true start state, writing out = y * silu(z).
// Backward, four launches:
//   local    per chunk, from the saved start state (chunk_states[c-1]), a forward walk that writes a
//            checkpoint of the state every kSegment tokens and accumulates the dh carried out of the chunk
//            from a zero carry, sum_t (prod_{s<=t} exp(delta_s A)) * dy_t C_t, as a running product (so the
//            walk goes forward, the direction of the states);
//   carry    per (batch, channel, state), the carries in reverse chunk order, as in the forward;
//   chunk    per chunk, segments of kSegment tokens from last to first: from the segment's checkpoint the
//            states of kRecompute tokens at a time are recomputed into registers (compile-time indexed,
//            so they stay there) and the tokens are walked backwards, producing du, ddelta, dz and the
//            per-token dB, dC contributions. Those are summed over the warp's 32 channels by a butterfly
//            reduce-scatter (31 shuffles for the 32 sums of a token instead of 5 per sum), then over the
//            block's warps in shared memory, into per-block partial sums in the workspace;
//   reduce   dB, dC = the partial sums over channel blocks, added in a fixed order: deterministic.
//
// Costs at the benchmark shape (batch 2, dim 4096, len 2048, N 16, chunk 64: E = 16.8M (b,t,d), E*N =
// 268M state updates, 524K warp-tokens; H100 ceilings: 3.0 TB/s; MUFU 16 lanes/clk/SM, i.e. a warp's
// MUFU op costs an SM 2 cycles; 4 warp instructions issued per clk per SM; 132 SMs at ~1.75 GHz):
//   forward, bytes: local 67 MB (u, delta) + 17 (states) + 1 (delta sums); carry 1 (delta sums) + 34
//     (states); output 101 (u, delta, z) + 17 + 34 (out) = ~270 MB = ~90 us. Every exp(delta*A) is one
//     MUFU ex2 (A is pre-scaled by log2 e): per warp-token 16 + ~2 for softplus/sigmoid, i.e. ~36 SM
//     cycles, against ~110 issued instructions (~28 cycles, from the SASS), so the local and output
//     kernels are MUFU-bound at ~80 us each: forward ~180-200 us (mamba-ssm: 334 us).
//   backward, bytes: u, delta, z, dout read twice (268 MB), checkpoints every 8 tokens written and read
//     (235), du, ddelta, dz (101), carries and partials (~100): ~700 MB = ~240 us. The local kernel is
//     balanced (~170 instructions and ~38 MUFU cycles per warp-token, ~300 MB): ~100 us. The chunk kernel
//     issues ~650 instructions per warp-token (SASS: ~420 for the reverse step, of which ~125 are the
//     butterfly's shuffles, adds and selects; ~130 for recomputing states; the rest softplus and
//     addressing) against ~100 MUFU cycles, so it is issue-bound, ~370 us. Backward ~500 us; fwd+bwd
//     ~700 us against mamba-ssm's 1681 us.
// Measured (ncu, base clocks, before the workspace): forward local 160 us, carry 62, output 238, all three
// latency-bound (half the stalls on global loads, occupancy 25-50%). Predicted after it: carry ~15-20 us
// (35 MB instead of 68; 512 blocks of 256 threads at 58 registers all resident in one wave, where the old
// 256 blocks of 512 threads at 85 registers fit one per SM and took two waves); local unchanged, ~160 us
// (one add per token, 62 registers: the same 8 blocks per SM); output ~190-200 us (8 tokens' loads in
// flight instead of 4 at the same 6 blocks per SM). Forward ~460 -> ~370 us.
// Checkpoints every kSegment = 8 tokens and recompute windows of kRecompute = 4 states balance register
// pressure (64 registers of states; the chunk kernel fits 168 registers, three blocks per SM) against
// checkpoint traffic: the second window of a segment first advances 4 tokens from the checkpoint, half a
// pass of recomputation instead of twice the checkpoints.
//
// Sequence boundaries. Document starts (doc_start[t] == t) are staged per token with the B and C rows; at
// a start the state is zeroed before the step (the decay factor is 0), the backward's running decay
// product is zeroed with it, and dh is not carried past it. A chunk containing a start forgets the state
// it was handed: its delta sum is replaced by kRestarted, which the carries read as a decay of exactly 0.
// Every per-token kernel is instantiated with and without documents (kDocs): without, it compiles to the
// code it had before. initial_state enters where chunk 0's start state is read (and the forward carry
// starts from it); d_final_state is the backward carry's start, and the carry that leaves chunk 0 is
// d_initial_state. selective_scan_final_state is the forward's local kernel plus a combine that keeps only
// the last state and the product of the chunk decays; selective_scan_initial_state_grad is the
// backward's local and carry kernels without the states.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/selective_scan.h"

namespace ssmtune::cuda {
namespace {

constexpr int kState = 16;
constexpr int kChannels = 128;  // threads (channels) per block of the per-chunk kernels
constexpr int kWarps = kChannels / 32;
constexpr int kTile = 64;        // tokens whose B, C rows are staged in shared memory at a time
// Tokens whose inputs are loaded together, so that their latencies overlap. The output kernel loads 8 at
// the same occupancy as 4 (80 registers, 6 blocks per SM); the local kernels would spill or lose a block
// per SM at 8 (nvcc --resource-usage), so they load 4.
constexpr int kGroup = 4;
constexpr int kOutputGroup = 8;
constexpr int kRecompute = 4;    // backward: states recomputed into registers at a time
constexpr int kSegment = 2 * kRecompute;  // backward: tokens between checkpoints
constexpr int kCarryTile = 16;            // forward carry: chunks whose inputs are loaded together
constexpr int kFlatThreads = 256;         // the kernels with one thread per output element
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// A chunk's delta sum when a document starts inside it (softplus is never negative, so no real sum is).
constexpr float kRestarted = -1.0f;

// What a per-chunk kernel reads per token: B rows, C rows, u, z, dout (delta always), document starts.
constexpr unsigned kInB = 1, kInC = 2, kInU = 4, kInZ = 8, kInDout = 16, kInStarts = 32;

struct ScanArgs {
  const __nv_bfloat16* u;
  const __nv_bfloat16* delta;
  const __nv_bfloat16* B;
  const __nv_bfloat16* C;
  const __nv_bfloat16* z;
  const float* delta_bias;
  const float* A;
  const float* Dskip;
  const int32_t* doc_start;    // may be null (then no kernel reads it)
  const float* initial_state;  // [batch, dim, state], h_{-1}; may be null = 0
  int64_t batch, len, dim, chunk_len, num_chunks, bc_stride, z_stride, out_stride;
  int dim_blocks;  // blocks of kChannels channels
};

// The backward's scratch (sizes in selective_scan_backward_workspace_bytes).
struct BackwardWorkspace {
  float* carry;        // [batch, chunks, state, dim]: dh out of each chunk from a zero carry, then in place
                       // the dh carried into the chunk's last token
  float* sumdelta;     // [batch, chunks, dim]: sum of softplus(delta + bias) over the chunk
  float* checkpoints;  // [batch, chunks, checkpoints_per_chunk, state, dim]: the state before the chunk's
                       // tokens kSegment, 2 kSegment, ...
  float* partials;     // [dim_blocks, batch * len, 2 * state]: dB then dC summed over one block's channels
  int64_t checkpoints_per_chunk;
};

struct Gradients {
  __nv_bfloat16* du;
  __nv_bfloat16* ddelta;
  __nv_bfloat16* dz;
};

// One MUFU op; results below 2^-126 flush to zero, far below anything a state or a gradient can resolve.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// log1p keeps softplus accurate where it is small (Mamba's dt is often ~1e-3); above 20, log1p(e^x) = x in fp32.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }

__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

// A row of 16 staged floats, as four 16-byte shared-memory loads (broadcasts: every lane reads the same row).
__device__ __forceinline__ void load_row(const float* row, float (&out)[kState]) {
#pragma unroll
  for (int q = 0; q < kState / 4; ++q) {
    const float4 v = reinterpret_cast<const float4*>(row)[q];
    out[4 * q] = v.x;
    out[4 * q + 1] = v.y;
    out[4 * q + 2] = v.z;
    out[4 * q + 3] = v.w;
  }
}

// The block's place: blocks enumerate (batch, chunk, channel block), channel blocks fastest, so blocks
// running together share their B and C rows in L2.
struct ChunkBlock {
  int64_t b, c, t0, t_end;
  int dim_block;
};
__device__ ChunkBlock chunk_block(const ScanArgs& a) {
  const int64_t sequence_chunk = int64_t(blockIdx.x) / a.dim_blocks;
  ChunkBlock blk;
  blk.b = sequence_chunk / a.num_chunks;
  blk.c = sequence_chunk % a.num_chunks;
  blk.t0 = blk.c * a.chunk_len;
  blk.t_end = min(blk.t0 + a.chunk_len, a.len);
  blk.dim_block = int(int64_t(blockIdx.x) % a.dim_blocks);
  return blk;
}

// A thread's channel. Threads past the last channel run on zeros (every product they form is 0) instead
// of leaving, so barriers and warp shuffles see the whole block.
struct Channel {
  int d;
  bool active;
  float A2[kState];  // A * log2(e): exp(delta * A) = exp2(delta * A2)
  float bias, Dskip;
};
__device__ Channel load_channel(const ScanArgs& a, int d) {
  Channel ch;
  ch.d = d;
  ch.active = d < a.dim;
#pragma unroll
  for (int n = 0; n < kState; ++n) ch.A2[n] = ch.active ? __ldg(a.A + int64_t(d) * kState + n) * kLog2e : 0.0f;
  ch.bias = ch.active ? __ldg(a.delta_bias + d) : 0.0f;
  ch.Dskip = ch.active && a.Dskip != nullptr ? __ldg(a.Dskip + d) : 0.0f;  // null where no output is formed
  return ch;
}

// Copies the B rows (kIn & kInB) and the C rows (kIn & kInC) of tokens t_begin .. t_begin + count - 1 to
// shared memory as fp32, B in columns 0..15 and C in 16..31, and with kInStarts whether a document starts
// at each token.
template <unsigned kIn>
__device__ void stage_rows(const ScanArgs& a, int64_t b, int64_t t_begin, int count, float (*rows)[2 * kState],
                           bool* starts) {
  constexpr int kColumns = ((kIn & kInB) ? kState : 0) + ((kIn & kInC) ? kState : 0);
  constexpr int kFirstColumn = (kIn & kInB) ? 0 : kState;
  for (int i = threadIdx.x; i < count * kColumns; i += blockDim.x) {
    const int token = i / kColumns, column = kFirstColumn + i % kColumns;
    const int64_t offset = (b * a.len + t_begin + token) * a.bc_stride;
    rows[token][column] = column < kState ? load(a.B + offset + column) : load(a.C + offset + column - kState);
  }
  if constexpr ((kIn & kInStarts) != 0) {
    for (int i = threadIdx.x; i < count; i += blockDim.x)
      starts[i] = __ldg(a.doc_start + b * a.len + t_begin + i) == t_begin + i;
  }
}

// One channel's inputs at up to kGroupSize consecutive tokens; pre = delta + delta_bias. Zeros where not loaded.
template <int kGroupSize>
struct Tokens {
  float u[kGroupSize] = {}, pre[kGroupSize] = {}, z[kGroupSize] = {}, dout[kGroupSize] = {};
};
template <int kGroupSize, unsigned kIn>
__device__ Tokens<kGroupSize> load_tokens(const ScanArgs& a, const Channel& ch, int64_t b, int64_t t_begin, int count,
                                          const __nv_bfloat16* dout) {
  Tokens<kGroupSize> x;
  if (!ch.active) return x;
#pragma unroll
  for (int k = 0; k < kGroupSize; ++k) {
    if (k < count) {
      const int64_t row = b * a.len + t_begin + k;
      if (kIn & kInU) x.u[k] = load(a.u + row * a.dim + ch.d);
      x.pre[k] = load(a.delta + row * a.dim + ch.d) + ch.bias;
      if (kIn & kInZ) x.z[k] = load(a.z + row * a.z_stride + ch.d);
      if (kIn & kInDout) x.dout[k] = load(dout + row * a.dim + ch.d);
    }
  }
  return x;
}

// h <- exp(delta * A) * h + delta * u * B, the recurrence of kernels/cpu/selective_scan.h; at a document's
// first token h is zeroed first (the same for the whole block: no divergence).
__device__ __forceinline__ void scan_step(float (&h)[kState], const float (&A2)[kState], float dt, float u,
                                          const float* B_row, bool starts) {
  float B[kState];
  load_row(B_row, B);
  const float du = dt * u;
  if (starts) {
#pragma unroll
    for (int n = 0; n < kState; ++n) h[n] = 0.0f;
  }
#pragma unroll
  for (int n = 0; n < kState; ++n) h[n] = fmaf(exp2_approx(dt * A2[n]), h[n], B[n] * du);
}

// The factor a carry crosses a chunk with: exp(A * sum of delta), or 0 if a document starts in the chunk.
template <bool kDocs>
__device__ __forceinline__ float chunk_decay(float A2, float sumdelta) {
  if (kDocs && sumdelta == kRestarted) return 0.0f;
  return exp2_approx(A2 * sumdelta);
}

__device__ __forceinline__ int64_t state_index(const ScanArgs& a, int64_t b, int64_t c, int d) {
  return ((b * a.num_chunks + c) * a.dim + d) * kState;
}

// The state before the chunk's first token: the previous chunk's end state; for the first chunk the
// initial state, or zero.
__device__ void load_chunk_start(const ScanArgs& a, const float* chunk_states, const ChunkBlock& blk,
                                 const Channel& ch, float (&h)[kState]) {
  const float* p = nullptr;
  if (blk.c > 0)
    p = chunk_states + state_index(a, blk.b, blk.c - 1, ch.d);
  else if (a.initial_state != nullptr)
    p = a.initial_state + (blk.b * a.dim + ch.d) * kState;
  const bool saved = ch.active && p != nullptr;
#pragma unroll
  for (int n = 0; n < kState; ++n) h[n] = saved ? __ldg(p + n) : 0.0f;
}

// Walks the block's chunk from first to last token: the rows kIn asks for staged kTile tokens at a time, the
// channel's inputs loaded kGroupSize tokens at a time; token(t, x, k, bc_row, starts) is called for every token
// t, x.*[k] holding its inputs and starts telling whether a document starts at t (always false without
// kInStarts). `rows` and `starts` are the block's staging areas; the barriers are block-wide.
template <int kGroupSize, unsigned kIn, typename Token>
__device__ __forceinline__ void walk_chunk(const ScanArgs& a, const ChunkBlock& blk, const Channel& ch,
                                           const __nv_bfloat16* dout, float (*rows)[2 * kState], bool* starts,
                                           Token&& token) {
  for (int64_t tile = blk.t0; tile < blk.t_end; tile += kTile) {
    const int tile_len = int(min(int64_t(kTile), blk.t_end - tile));
    __syncthreads();  // the previous tile's rows have been read
    stage_rows<kIn>(a, blk.b, tile, tile_len, rows, starts);
    __syncthreads();
    for (int i = 0; i < tile_len; i += kGroupSize) {
      const int count = min(kGroupSize, tile_len - i);
      const Tokens<kGroupSize> x = load_tokens<kGroupSize, kIn>(a, ch, blk.b, tile + i, count, dout);
#pragma unroll
      for (int k = 0; k < kGroupSize; ++k)
        if (k < count) token(tile + i + k, x, k, rows[i + k], (kIn & kInStarts) != 0 && starts[i + k]);
    }
  }
}

// kInStarts for the instantiations with documents.
template <bool kDocs>
constexpr unsigned kInStartsIf = kDocs ? kInStarts : 0u;

__device__ __forceinline__ int64_t sumdelta_index(const ScanArgs& a, int64_t b, int64_t c, int d) {
  return (b * a.num_chunks + c) * a.dim + d;
}

// Also leaves sum_{t in chunk} softplus(delta_t + bias) in sumdelta [batch, chunks, dim] for the carry
// (kRestarted if a document starts in the chunk).
template <bool kDocs>
__global__ void __launch_bounds__(kChannels, 8)
    forward_local_kernel(ScanArgs a, float* chunk_states, float* sumdelta) {
  __shared__ __align__(16) float rows[kTile][2 * kState];
  __shared__ bool starts[kTile];
  const ChunkBlock blk = chunk_block(a);
  const Channel ch = load_channel(a, blk.dim_block * kChannels + threadIdx.x);
  float h[kState] = {};
  float dt_sum = 0.0f;
  bool restarted = false;
  walk_chunk<kGroup, kInB | kInU | kInStartsIf<kDocs>>(
      a, blk, ch, nullptr, rows, starts,
      [&](int64_t, const Tokens<kGroup>& x, int k, const float* bc_row, bool starts_here) {
        const float dt = softplus(x.pre[k]);
        dt_sum += dt;
        restarted |= starts_here;
        scan_step(h, ch.A2, dt, x.u[k], bc_row, starts_here);
      });
  if (kDocs && restarted) dt_sum = kRestarted;
  if (ch.active) {
    float* p = chunk_states + state_index(a, blk.b, blk.c, ch.d);
#pragma unroll
    for (int n = 0; n < kState; ++n) p[n] = h[n];
    sumdelta[sumdelta_index(a, blk.b, blk.c, ch.d)] = dt_sum;
  }
}

// One thread per (batch, channel, state), states fastest as in chunk_states, so a warp reads and writes
// 128 contiguous bytes: the chunks in order, with the delta sums the local kernel left. The inputs of
// kCarryTile chunks are loaded before their chain of dependent updates, so their latencies overlap.
// Starts from the initial state (i is its index too) or zero.
template <bool kDocs>
__global__ void __launch_bounds__(kFlatThreads)
    forward_carry_kernel(ScanArgs a, const float* sumdelta, float* chunk_states) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.batch * a.dim * kState) return;
  const int n = int(i % kState), d = int(i / kState % a.dim);
  const int64_t b = i / (a.dim * kState);
  const float A2 = __ldg(a.A + int64_t(d) * kState + n) * kLog2e;
  const int64_t state_stride = a.dim * kState;  // from one chunk to the next
  float* state = chunk_states + state_index(a, b, 0, d) + n;
  const float* sum = sumdelta + sumdelta_index(a, b, 0, d);
  float h = a.initial_state != nullptr ? __ldg(a.initial_state + i) : 0.0f;
  for (int64_t c0 = 0; c0 < a.num_chunks; c0 += kCarryTile) {
    const int count = int(min(int64_t(kCarryTile), a.num_chunks - c0));
    float local[kCarryTile], tile_sum[kCarryTile];
#pragma unroll
    for (int j = 0; j < kCarryTile; ++j) {
      if (j < count) {
        local[j] = state[j * state_stride];
        tile_sum[j] = __ldg(sum + j * a.dim);
      }
    }
#pragma unroll
    for (int j = 0; j < kCarryTile; ++j) {
      if (j < count) {
        h = fmaf(chunk_decay<kDocs>(A2, tile_sum[j]), h, local[j]);
        state[j * state_stride] = h;
      }
    }
    state += kCarryTile * state_stride;
    sum += kCarryTile * a.dim;
  }
}

template <bool kDocs>
__global__ void __launch_bounds__(kChannels, 6)
    forward_output_kernel(ScanArgs a, const float* chunk_states, __nv_bfloat16* out) {
  __shared__ __align__(16) float rows[kTile][2 * kState];
  __shared__ bool starts[kTile];
  const ChunkBlock blk = chunk_block(a);
  const Channel ch = load_channel(a, blk.dim_block * kChannels + threadIdx.x);
  float h[kState];
  load_chunk_start(a, chunk_states, blk, ch, h);
  walk_chunk<kOutputGroup, kInB | kInC | kInU | kInZ | kInStartsIf<kDocs>>(
      a, blk, ch, nullptr, rows, starts,
      [&](int64_t t, const Tokens<kOutputGroup>& x, int k, const float* bc_row, bool starts_here) {
        scan_step(h, ch.A2, softplus(x.pre[k]), x.u[k], bc_row, starts_here);
        float C[kState];
        load_row(bc_row + kState, C);
        float y = 0.0f;
#pragma unroll
        for (int n = 0; n < kState; ++n) y = fmaf(C[n], h[n], y);
        y = fmaf(ch.Dskip, x.u[k], y);
        if (ch.active) out[(blk.b * a.len + t) * a.out_stride + ch.d] = __float2bfloat16_rn(y * (x.z[k] * sigmoid(x.z[k])));
      });
}

__device__ __forceinline__ int64_t carry_index(const ScanArgs& a, int64_t b, int64_t c, int n, int d) {
  return ((b * a.num_chunks + c) * kState + n) * a.dim + d;
}

__device__ __forceinline__ int64_t checkpoint_index(const ScanArgs& a, const BackwardWorkspace& w, int64_t b,
                                                    int64_t c, int k, int n, int d) {
  return (((b * a.num_chunks + c) * w.checkpoints_per_chunk + k) * kState + n) * a.dim + d;
}

// dh carried out of a chunk (into its first token's predecessor) from a zero carry in:
// sum over t of P_t * dy_t * C_t with P_t = prod_{s = t0..t} exp(delta_s * A), dy_t = dout_t * silu(z_t)
// (P_t = 0 from a document start on). With kStates (the backward) it also walks the states from the saved
// start state, writing the checkpoints; without (selective_scan_initial_state_grad) it reads no u, no B.
template <bool kDocs, bool kStates>
__global__ void __launch_bounds__(kChannels, 4)
    backward_local_kernel(ScanArgs a, const float* chunk_states, const __nv_bfloat16* dout, BackwardWorkspace w) {
  __shared__ __align__(16) float rows[kTile][2 * kState];
  __shared__ bool starts[kTile];
  const ChunkBlock blk = chunk_block(a);
  const Channel ch = load_channel(a, blk.dim_block * kChannels + threadIdx.x);
  float h[kState], decay_product[kState], carry[kState];
  if (kStates) load_chunk_start(a, chunk_states, blk, ch, h);
#pragma unroll
  for (int n = 0; n < kState; ++n) {
    decay_product[n] = 1.0f;
    carry[n] = 0.0f;
  }
  float sumdelta = 0.0f;
  bool restarted = false;
  constexpr unsigned kIn = kInC | kInZ | kInDout | (kStates ? kInB | kInU : 0u) | kInStartsIf<kDocs>;
  walk_chunk<kGroup, kIn>(
      a, blk, ch, dout, rows, starts,
      [&](int64_t t, const Tokens<kGroup>& x, int k, const float* bc_row, bool starts_here) {
        const int local_t = int(t - blk.t0);
        if (kStates && local_t % kSegment == 0 && local_t > 0 && ch.active) {
#pragma unroll
          for (int n = 0; n < kState; ++n)
            w.checkpoints[checkpoint_index(a, w, blk.b, blk.c, local_t / kSegment - 1, n, ch.d)] = h[n];
        }
        float B[kState], C[kState];
        if (kStates) load_row(bc_row, B);
        load_row(bc_row + kState, C);
        const float dt = softplus(x.pre[k]);
        sumdelta += dt;
        restarted |= starts_here;
        const float du = dt * x.u[k];
        const float dy = x.dout[k] * (x.z[k] * sigmoid(x.z[k]));
        if (starts_here) {
#pragma unroll
          for (int n = 0; n < kState; ++n) {
            h[n] = 0.0f;
            decay_product[n] = 0.0f;
          }
        }
#pragma unroll
        for (int n = 0; n < kState; ++n) {
          const float decay = exp2_approx(dt * ch.A2[n]);
          if (kStates) h[n] = fmaf(decay, h[n], B[n] * du);
          decay_product[n] *= decay;
          carry[n] = fmaf(decay_product[n], dy * C[n], carry[n]);
        }
      });
  if (kDocs && restarted) sumdelta = kRestarted;
  if (ch.active) {
#pragma unroll
    for (int n = 0; n < kState; ++n) w.carry[carry_index(a, blk.b, blk.c, n, ch.d)] = carry[n];
    w.sumdelta[sumdelta_index(a, blk.b, blk.c, ch.d)] = sumdelta;
  }
}

// One thread per (batch, state, channel), channels fastest: chunks from last to first, carry_in[c] =
// carry_out[c + 1] and carry_out[c] = local[c] + exp(A * sumdelta[c]) * carry_in[c]; carry_in of the last
// chunk is d_final_state (or zero), and carry_out[0] is the gradient w.r.t. the initial state, written to
// d_initial_state when given. d_final_state and d_initial_state are [batch, dim, state].
template <bool kDocs>
__global__ void __launch_bounds__(kFlatThreads)
    backward_carry_kernel(ScanArgs a, BackwardWorkspace w, const float* d_final_state, float* d_initial_state) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.batch * kState * a.dim) return;
  const int d = int(i % a.dim), n = int(i / a.dim % kState);
  const int64_t b = i / (a.dim * kState);
  const int64_t state_at = (b * a.dim + d) * kState + n;
  const float A2 = __ldg(a.A + int64_t(d) * kState + n) * kLog2e;
  const int64_t last = a.num_chunks - 1;  // -1 for an empty sequence: then d_initial_state = d_final_state
  float next_local = last >= 0 ? w.carry[carry_index(a, b, last, n, d)] : 0.0f;
  float next_sumdelta = last >= 0 ? w.sumdelta[sumdelta_index(a, b, last, d)] : 0.0f;
  float carry = d_final_state != nullptr ? __ldg(d_final_state + state_at) : 0.0f;
  for (int64_t c = last; c >= 0; --c) {
    const float local = next_local, sumdelta = next_sumdelta;
    if (c > 0) {  // issued before this chunk's dependent arithmetic
      next_local = w.carry[carry_index(a, b, c - 1, n, d)];
      next_sumdelta = w.sumdelta[sumdelta_index(a, b, c - 1, d)];
    }
    w.carry[carry_index(a, b, c, n, d)] = carry;
    carry = fmaf(chunk_decay<kDocs>(A2, sumdelta), carry, local);
  }
  if (d_initial_state != nullptr) d_initial_state[state_at] = carry;
}

// One step of a butterfly reduce-scatter across the warp: lanes with bit `half` set keep the upper value of
// the pair and the others the lower, each adding its partner's copy of the value it keeps.
__device__ __forceinline__ float butterfly_step(float lower, float upper, int half, int lane) {
  const bool take_upper = lane & half;
  return (take_upper ? upper : lower) + __shfl_xor_sync(0xffffffffu, take_upper ? lower : upper, half);
}

// The remaining steps on 2 * kHalf values: afterwards lane l holds in v[0] the value number l % (2 * kHalf).
// Recursion rather than a loop over the step width keeps every index a compile-time constant.
template <int kHalf>
__device__ __forceinline__ void butterfly(float (&v)[kState], int lane) {
#pragma unroll
  for (int n = 0; n < kHalf; ++n) v[n] = butterfly_step(v[n], v[n + kHalf], kHalf, lane);
  if constexpr (kHalf > 1) butterfly<kHalf / 2>(v, lane);
}

// The reverse step at one token (CPU backward, same names): updates dh to the carry into the previous
// token, returns du, ddelta, dz through the references and, as its value, this lane's share of the warp's
// token sums: lane l < 16 gets sum over the warp of dB_t[l], lane 16 + n gets that of dC_t[n].
__device__ __forceinline__ float backward_token(const Channel& ch, const float (&h_prev)[kState], float (&dh)[kState],
                                                const float* bc_row, float u, float dt, float pre, float z,
                                                float dout, int lane, float& du_out, float& ddelta_out,
                                                float& dz_out) {
  float B[kState], C[kState];
  load_row(bc_row, B);
  load_row(bc_row + kState, C);
  const float du = dt * u;
  const float sig_z = sigmoid(z);
  const float dy = dout * (z * sig_z);
  float y = 0.0f, dh_B = 0.0f, dh_Aa = 0.0f;
  float sums[kState];  // after the first butterfly step: the warp pair sums of dB[n] or dC[n]
#pragma unroll
  for (int n = 0; n < kState; ++n) {
    const float decay = exp2_approx(dt * ch.A2[n]);
    const float a_n = decay * h_prev[n];
    const float h_n = fmaf(B[n], du, a_n);
    y = fmaf(C[n], h_n, y);
    const float dh_t = fmaf(dy, C[n], dh[n]);
    dh_B = fmaf(dh_t, B[n], dh_B);
    dh_Aa = fmaf(dh_t * a_n, ch.A2[n], dh_Aa);
    dh[n] = decay * dh_t;
    sums[n] = butterfly_step(dh_t * du, dy * h_n, 16, lane);
  }
  butterfly<kState / 2>(sums, lane);
  y = fmaf(ch.Dskip, u, y);
  du_out = fmaf(dt, dh_B, dy * ch.Dskip);
  ddelta_out = sigmoid(pre) * fmaf(u, dh_B, kLn2 * dh_Aa);  // A = A2 * ln 2
  dz_out = dout * y * sig_z * (1.0f + z * (1.0f - sig_z));
  return sums[0];
}

template <bool kDocs>
__global__ void __launch_bounds__(kChannels, 3)
    backward_chunk_kernel(ScanArgs a, const float* chunk_states, const __nv_bfloat16* dout, BackwardWorkspace w,
                          Gradients g) {
  __shared__ __align__(16) float rows[kSegment][2 * kState];
  __shared__ bool starts[kSegment];
  __shared__ float warp_sums[2][kRecompute][kWarps][2 * kState];  // double-buffered: one barrier per window
  const ChunkBlock blk = chunk_block(a);
  const Channel ch = load_channel(a, blk.dim_block * kChannels + threadIdx.x);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rows_total = a.batch * a.len;
  float dh[kState];
#pragma unroll
  for (int n = 0; n < kState; ++n) dh[n] = ch.active ? w.carry[carry_index(a, blk.b, blk.c, n, ch.d)] : 0.0f;
  const int chunk_tokens = int(blk.t_end - blk.t0);
  int buffer = 0;
  for (int k = (chunk_tokens - 1) / kSegment; k >= 0; --k) {
    const int64_t segment_t0 = blk.t0 + int64_t(k) * kSegment;
    const int segment_len = min(kSegment, chunk_tokens - k * kSegment);
    // The previous segment's rows were last read before its last window's barrier.
    stage_rows<kInB | kInC | kInStartsIf<kDocs>>(a, blk.b, segment_t0, segment_len, rows, starts);
    __syncthreads();
    for (int window = kSegment / kRecompute - 1; window >= 0; --window) {
      const int first = window * kRecompute;  // the window's first token within the segment
      if (first >= segment_len) continue;
      const int count = min(kRecompute, segment_len - first);
      // states[s] = the state before token first + s.
      float states[kRecompute][kState];
      if (k == 0) {
        load_chunk_start(a, chunk_states, blk, ch, states[0]);
      } else {
#pragma unroll
        for (int n = 0; n < kState; ++n)
          states[0][n] = ch.active ? w.checkpoints[checkpoint_index(a, w, blk.b, blk.c, k - 1, n, ch.d)] : 0.0f;
      }
      for (int i = 0; i < first; i += kRecompute) {  // advance from the checkpoint to the window
        const Tokens<kRecompute> x = load_tokens<kRecompute, kInU>(a, ch, blk.b, segment_t0 + i, kRecompute, nullptr);
#pragma unroll
        for (int s = 0; s < kRecompute; ++s)
          scan_step(states[0], ch.A2, softplus(x.pre[s]), x.u[s], rows[i + s], kDocs && starts[i + s]);
      }
      const Tokens<kRecompute> x =
          load_tokens<kRecompute, kInU | kInZ | kInDout>(a, ch, blk.b, segment_t0 + first, count, dout);
      float dt[kRecompute];
#pragma unroll
      for (int s = 0; s < kRecompute; ++s) dt[s] = softplus(x.pre[s]);
#pragma unroll
      for (int s = 1; s < kRecompute; ++s) {
        if (s < count) {
#pragma unroll
          for (int n = 0; n < kState; ++n) states[s][n] = states[s - 1][n];
          scan_step(states[s], ch.A2, dt[s - 1], x.u[s - 1], rows[first + s - 1], kDocs && starts[first + s - 1]);
        }
      }
#pragma unroll
      for (int s = kRecompute - 1; s >= 0; --s) {
        if (s < count) {
          // At a document's first token the decay factor is 0: nothing of the state before it enters (that
          // state, states[s], is not needed again: token s - 1 reads states[s - 1]) and no dh leaves.
          const bool starts_here = kDocs && starts[first + s];
          if (starts_here) {
#pragma unroll
            for (int n = 0; n < kState; ++n) states[s][n] = 0.0f;
          }
          float du, ddelta, dz;
          warp_sums[buffer][s][warp][lane] = backward_token(ch, states[s], dh, rows[first + s], x.u[s], dt[s],
                                                            x.pre[s], x.z[s], x.dout[s], lane, du, ddelta, dz);
          if (starts_here) {
#pragma unroll
            for (int n = 0; n < kState; ++n) dh[n] = 0.0f;
          }
          if (ch.active) {
            const int64_t row = blk.b * a.len + segment_t0 + first + s;
            g.du[row * a.dim + ch.d] = __float2bfloat16_rn(du);
            g.ddelta[row * a.dim + ch.d] = __float2bfloat16_rn(ddelta);
            g.dz[row * a.z_stride + ch.d] = __float2bfloat16_rn(dz);
          }
        }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < kRecompute * 2 * kState; i += kChannels) {
        const int s = i / (2 * kState), column = i % (2 * kState);
        if (s < count) {
          float sum = 0.0f;
#pragma unroll
          for (int v = 0; v < kWarps; ++v) sum += warp_sums[buffer][s][v][column];
          const int64_t row = blk.b * a.len + segment_t0 + first + s;
          w.partials[(blk.dim_block * rows_total + row) * (2 * kState) + column] = sum;
        }
      }
      buffer ^= 1;
    }
  }
}

// One thread per (row, column of dB|dC): the channel blocks' partial sums added in block order.
__global__ void __launch_bounds__(kFlatThreads)
    reduce_bc_kernel(const float* partials, int dim_blocks, int64_t rows, int64_t bc_stride, __nv_bfloat16* dB,
                     __nv_bfloat16* dC) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * 2 * kState) return;
  float sum = 0.0f;
  for (int block = 0; block < dim_blocks; ++block) sum += partials[block * rows * (2 * kState) + i];
  const int64_t row = i / (2 * kState);
  const int column = int(i % (2 * kState));
  __nv_bfloat16* target = column < kState ? dB + column : dC + column - kState;
  target[row * bc_stride] = __float2bfloat16_rn(sum);
}

// selective_scan_final_state's combine, one thread per (batch, channel, state) as the forward carry: the
// chunks' end states from a zero start (the local kernel's) carried across the chunks from a zero initial
// state, keeping only the last, and the product of the chunk decays. i indexes final_state and decay.
template <bool kDocs>
__global__ void __launch_bounds__(kFlatThreads)
    final_state_kernel(ScanArgs a, const float* sumdelta, const float* local_states, float* final_state, float* decay) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.batch * a.dim * kState) return;
  const int n = int(i % kState), d = int(i / kState % a.dim);
  const int64_t b = i / (a.dim * kState);
  const float A2 = __ldg(a.A + int64_t(d) * kState + n) * kLog2e;
  const float* state = local_states + state_index(a, b, 0, d) + n;
  const float* sum = sumdelta + sumdelta_index(a, b, 0, d);
  float h = 0.0f, product = 1.0f;
#pragma unroll 8
  for (int64_t c = 0; c < a.num_chunks; ++c) {
    const float chunk = chunk_decay<kDocs>(A2, __ldg(sum + c * a.dim));
    h = fmaf(chunk, h, __ldg(state + c * a.dim * kState));
    product *= chunk;
  }
  final_state[i] = h;
  decay[i] = product;
}

// Offsets (in floats) of the backward workspace's arrays, each starting on a 256-byte boundary.
struct WorkspaceLayout {
  int64_t checkpoints_per_chunk;
  int64_t carry, sumdelta, checkpoints, partials, total;
};
int64_t round_up_256_bytes(int64_t floats) { return (floats + 63) / 64 * 64; }
int dim_blocks_of(const cpu::SelectiveScanShape& s) { return int((s.dim + kChannels - 1) / kChannels); }

WorkspaceLayout workspace_layout(const cpu::SelectiveScanShape& s) {
  const int64_t chunks = cpu::selective_scan_num_chunks(s);
  const int64_t chunk_tokens = std::min(s.chunk_len, s.len);
  WorkspaceLayout l;
  l.checkpoints_per_chunk = std::max<int64_t>(0, (chunk_tokens + kSegment - 1) / kSegment - 1);
  l.carry = 0;
  l.sumdelta = l.carry + round_up_256_bytes(s.batch * chunks * kState * s.dim);
  l.checkpoints = l.sumdelta + round_up_256_bytes(s.batch * chunks * s.dim);
  l.partials = l.checkpoints + round_up_256_bytes(s.batch * chunks * l.checkpoints_per_chunk * kState * s.dim);
  l.total = l.partials + round_up_256_bytes(int64_t(dim_blocks_of(s)) * s.batch * s.len * 2 * kState);
  return l;
}

void check_shape(const cpu::SelectiveScanShape& s, const char* op) {
  if (s.state != kState)
    throw std::invalid_argument(std::string(op) + ": only state == 16 is supported, got " + std::to_string(s.state));
  if (s.chunk_len < 1) throw std::invalid_argument(std::string(op) + ": chunk_len must be >= 1");
  if (s.batch < 0 || s.len < 0 || s.dim < 0)
    throw std::invalid_argument(std::string(op) + ": batch, len and dim must be >= 0");
}

unsigned grid_size(int64_t blocks, const char* op) {
  if (blocks > std::numeric_limits<int>::max()) throw std::invalid_argument(std::string(op) + ": shape too large");
  return static_cast<unsigned>(blocks);
}

ScanArgs scan_args(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta, const float* delta_bias,
                   const float* A, const uint16_t* B, const uint16_t* C, int64_t bc_row_stride, const float* Dskip,
                   const uint16_t* z, int64_t z_row_stride, int64_t out_row_stride, const int32_t* doc_start,
                   const float* initial_state) {
  auto bf16 = [](const uint16_t* p) { return reinterpret_cast<const __nv_bfloat16*>(p); };
  return {bf16(u),
          bf16(delta),
          bf16(B),
          bf16(C),
          bf16(z),
          delta_bias,
          A,
          Dskip,
          doc_start,
          initial_state,
          s.batch,
          s.len,
          s.dim,
          s.chunk_len,
          cpu::selective_scan_num_chunks(s),
          bc_row_stride,
          z_row_stride,
          out_row_stride,
          dim_blocks_of(s)};
}

// Blocks of the per-chunk kernels and of the one-thread-per-(batch, channel, state) kernels.
unsigned chunk_grid(const ScanArgs& a, const char* op) { return grid_size(a.batch * a.num_chunks * a.dim_blocks, op); }
unsigned state_grid(const ScanArgs& a, const char* op) {
  return grid_size((a.batch * a.dim * kState + kFlatThreads - 1) / kFlatThreads, op);
}

// Offsets (in floats) of selective_scan_final_state's workspace: the chunks' local end states, then their
// delta sums.
struct FinalStateLayout {
  int64_t states, sumdelta, total;
};
FinalStateLayout final_state_layout(const cpu::SelectiveScanShape& s) {
  const int64_t chunks = cpu::selective_scan_num_chunks(s);
  FinalStateLayout l;
  l.states = 0;
  l.sumdelta = round_up_256_bytes(s.batch * chunks * s.dim * kState);
  l.total = l.sumdelta + round_up_256_bytes(s.batch * chunks * s.dim);
  return l;
}

template <bool kDocs>
void launch_forward(const ScanArgs& a, float* chunk_states, float* sumdelta, __nv_bfloat16* out, cudaStream_t st) {
  constexpr const char* kOp = "selective_scan_forward";
  forward_local_kernel<kDocs><<<chunk_grid(a, kOp), kChannels, 0, st>>>(a, chunk_states, sumdelta);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_forward local launch");
  // A single chunk's local end state is already the true one, unless an initial state flows in.
  if (a.num_chunks > 1 || a.initial_state != nullptr) {
    forward_carry_kernel<kDocs><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(a, sumdelta, chunk_states);
    SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_forward carry launch");
  }
  forward_output_kernel<kDocs><<<chunk_grid(a, kOp), kChannels, 0, st>>>(a, chunk_states, out);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_forward output launch");
}

template <bool kDocs>
void launch_backward(const ScanArgs& a, const float* chunk_states, const __nv_bfloat16* dout, const BackwardWorkspace& w,
                     const Gradients& g, const float* d_final_state, float* d_initial_state, cudaStream_t st) {
  constexpr const char* kOp = "selective_scan_backward";
  backward_local_kernel<kDocs, true><<<chunk_grid(a, kOp), kChannels, 0, st>>>(a, chunk_states, dout, w);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_backward local launch");
  backward_carry_kernel<kDocs><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(a, w, d_final_state, d_initial_state);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_backward carry launch");
  backward_chunk_kernel<kDocs><<<chunk_grid(a, kOp), kChannels, 0, st>>>(a, chunk_states, dout, w, g);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_backward chunk launch");
}

template <bool kDocs>
void launch_final_state(const ScanArgs& a, float* local_states, float* sumdelta, float* final_state, float* decay,
                        cudaStream_t st) {
  constexpr const char* kOp = "selective_scan_final_state";
  if (a.num_chunks > 0) {
    forward_local_kernel<kDocs><<<chunk_grid(a, kOp), kChannels, 0, st>>>(a, local_states, sumdelta);
    SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_final_state local launch");
  }
  final_state_kernel<kDocs><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(a, sumdelta, local_states, final_state, decay);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_final_state combine launch");
}

template <bool kDocs>
void launch_initial_state_grad(const ScanArgs& a, const __nv_bfloat16* dout, const BackwardWorkspace& w,
                               float* d_initial_state, cudaStream_t st) {
  constexpr const char* kOp = "selective_scan_initial_state_grad";
  if (a.num_chunks > 0) {
    backward_local_kernel<kDocs, false><<<chunk_grid(a, kOp), kChannels, 0, st>>>(a, nullptr, dout, w);
    SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_initial_state_grad local launch");
  }
  backward_carry_kernel<kDocs><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(a, w, nullptr, d_initial_state);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_initial_state_grad carry launch");
}

BackwardWorkspace backward_workspace(const WorkspaceLayout& l, void* workspace) {
  float* base = static_cast<float*>(workspace);
  return {base + l.carry, base + l.sumdelta, base + l.checkpoints, base + l.partials, l.checkpoints_per_chunk};
}

const __nv_bfloat16* bf16(const uint16_t* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }
__nv_bfloat16* bf16(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

}  // namespace

size_t selective_scan_forward_workspace_bytes(const cpu::SelectiveScanShape& s) {
  check_shape(s, "selective_scan_forward_workspace_bytes");
  return static_cast<size_t>(round_up_256_bytes(s.batch * cpu::selective_scan_num_chunks(s) * s.dim)) * sizeof(float);
}

size_t selective_scan_backward_workspace_bytes(const cpu::SelectiveScanShape& s) {
  check_shape(s, "selective_scan_backward_workspace_bytes");
  return static_cast<size_t>(workspace_layout(s).total) * sizeof(float);
}

size_t selective_scan_final_state_workspace_bytes(const cpu::SelectiveScanShape& s) {
  check_shape(s, "selective_scan_final_state_workspace_bytes");
  return static_cast<size_t>(final_state_layout(s).total) * sizeof(float);
}

// The backward's carry and sumdelta arrays, which begin its layout.
size_t selective_scan_initial_state_grad_workspace_bytes(const cpu::SelectiveScanShape& s) {
  check_shape(s, "selective_scan_initial_state_grad_workspace_bytes");
  return static_cast<size_t>(workspace_layout(s).checkpoints) * sizeof(float);
}

void selective_scan_forward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                            const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                            int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                            uint16_t* out, int64_t out_row_stride, float* chunk_states, void* workspace,
                            const int32_t* doc_start, const float* initial_state, void* stream) {
  check_shape(s, "selective_scan_forward");
  if (out_row_stride < s.dim)
    throw std::invalid_argument("selective_scan_forward: out_row_stride " + std::to_string(out_row_stride) +
                                " is smaller than dim " + std::to_string(s.dim));
  if (s.batch == 0 || s.len == 0 || s.dim == 0) return;
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, C, bc_row_stride, Dskip, z, z_row_stride, out_row_stride,
                               doc_start, initial_state);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  float* sumdelta = static_cast<float*>(workspace);
  if (doc_start != nullptr)
    launch_forward<true>(a, chunk_states, sumdelta, bf16(out), st);
  else
    launch_forward<false>(a, chunk_states, sumdelta, bf16(out), st);
}

void selective_scan_backward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                             const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                             int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                             const float* chunk_states, const uint16_t* dout, uint16_t* du, uint16_t* ddelta,
                             uint16_t* dB, uint16_t* dC, uint16_t* dz, void* workspace, const int32_t* doc_start,
                             const float* initial_state, const float* d_final_state, float* d_initial_state,
                             void* stream) {
  constexpr const char* kOp = "selective_scan_backward";
  check_shape(s, kOp);
  if (s.batch == 0) return;
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, C, bc_row_stride, Dskip, z, z_row_stride, s.dim,
                               doc_start, initial_state);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const BackwardWorkspace w = backward_workspace(workspace_layout(s), workspace);
  if (s.len == 0) {  // no tokens: the gradient arriving at h_{len-1} = h_{-1} passes straight through the carry
    if (s.dim > 0 && d_initial_state != nullptr) {
      backward_carry_kernel<false><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(a, w, d_final_state, d_initial_state);
      SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_backward carry launch");
    }
    return;
  }
  if (s.dim > 0) {
    const Gradients g{bf16(du), bf16(ddelta), bf16(dz)};
    if (doc_start != nullptr)
      launch_backward<true>(a, chunk_states, bf16(dout), w, g, d_final_state, d_initial_state, st);
    else
      launch_backward<false>(a, chunk_states, bf16(dout), w, g, d_final_state, d_initial_state, st);
  }
  // With dim == 0 there are no partial sums and dB, dC are written as zeros, as the CPU reference does.
  const int64_t rows = s.batch * s.len;
  const unsigned reduce_blocks = grid_size((rows * 2 * kState + kFlatThreads - 1) / kFlatThreads, kOp);
  reduce_bc_kernel<<<reduce_blocks, kFlatThreads, 0, st>>>(w.partials, a.dim_blocks, rows, bc_row_stride, bf16(dB),
                                                           bf16(dC));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_backward reduce launch");
}

void selective_scan_final_state(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                const float* delta_bias, const float* A, const uint16_t* B, int64_t bc_row_stride,
                                const int32_t* doc_start, float* final_state, float* decay, void* workspace,
                                void* stream) {
  check_shape(s, "selective_scan_final_state");
  if (s.batch == 0 || s.dim == 0) return;
  // Only the local kernel's reads: u, delta, B (no C, z, Dskip, output).
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, nullptr, bc_row_stride, nullptr, nullptr, 0, s.dim,
                               doc_start, nullptr);
  const FinalStateLayout l = final_state_layout(s);
  float* base = static_cast<float*>(workspace);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (doc_start != nullptr)
    launch_final_state<true>(a, base + l.states, base + l.sumdelta, final_state, decay, st);
  else
    launch_final_state<false>(a, base + l.states, base + l.sumdelta, final_state, decay, st);
}

void selective_scan_initial_state_grad(const cpu::SelectiveScanShape& s, const uint16_t* delta,
                                       const float* delta_bias, const float* A, const uint16_t* C,
                                       int64_t bc_row_stride, const uint16_t* z, int64_t z_row_stride,
                                       const uint16_t* dout, const int32_t* doc_start, float* d_initial_state,
                                       void* workspace, void* stream) {
  check_shape(s, "selective_scan_initial_state_grad");
  if (s.batch == 0 || s.dim == 0) return;
  // No u, B, Dskip: the reverse recurrence of dh reads only delta, C, z and dout.
  const ScanArgs a = scan_args(s, nullptr, delta, delta_bias, A, nullptr, C, bc_row_stride, nullptr, z, z_row_stride,
                               s.dim, doc_start, nullptr);
  const BackwardWorkspace w = backward_workspace(workspace_layout(s), workspace);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (doc_start != nullptr)
    launch_initial_state_grad<true>(a, bf16(dout), w, d_initial_state, st);
  else
    launch_initial_state_grad<false>(a, bf16(dout), w, d_initial_state, st);
}

}  // namespace ssmtune::cuda
