// Selective scan on the GPU (math: kernels/cpu/selective_scan.h; contract: kernels/cuda/selective_scan.h).
//
// Work split. A thread owns one channel d of one chunk of one sequence and keeps the N = 16 fp32 states
// of that channel in registers; a block holds kChannels consecutive channels of the same (batch, chunk),
// so the per-token loads of u, delta, z, dout are coalesced across a warp and the token's B and C rows,
// the same for every channel, are staged once per block in shared memory and read as broadcasts.
//
// Forward, one launch (forward_pass_kernel, below): a block walks 32 channels of one sequence from the
// first token to the last, 4 states of each channel per thread, writing the output and the states at
// chunk ends. The chunked forward, three launches, serves the split forward (context parallelism):
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
//            per-token dB, dC contributions. Those are summed over the warp's 32 channels through shared
//            memory (each lane stores its 32 values as a row, then adds up one column), then over the
//            block's warps, into per-block partial sums in the workspace;
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
//     ~700 us against mamba-ssm's 1681 us. Measured: fwd+bwd 1215 us. Replacing the butterfly by the
//     shared-memory sums (8 vector stores, 32 loads and 31 adds per token instead of ~125 instructions)
//     gained only 0.6-1.1%, so the chunk kernel is not bound by issue (recipes/bench/NOTES.md, run 9).
// The single-pass forward forms each exponential once instead of twice. ncu on its first version (base
// clocks, 385 us): issue-bound at IPC 2.15 with 7.7 warps per SM, ~330 instructions per (t, d), mostly
// per-token guards, 64-bit address arithmetic and the staging; without them (rows past the end step
// harmlessly, tiles addressed by pointer increments) the bench shape went 313 -> 243 us, 1.38x mamba-ssm.
// Its floor is the ~80 FP32/MUFU instructions per (t, d) of 16 state updates: ~60 us at IPC 3. Its
// parallelism is batch * dim / 32 blocks: 160 for (1, 5120, 8192), fewer than two per SM, hence 946 us.
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
// d_initial_state.
//
// Split in two (context parallelism). The forward's begin is its local and carry kernels from a zero
// initial state, which leave every chunk's end state from a zero start, and a combine that reads the
// last of them and multiplies the chunk decays (final_state, decay); its end adds an initial state h0
// into the saved states, state[c] += (prod_{c' <= c} decay_c') * h0 (the states are linear in h0), and
// runs the output kernel from h0. The backward's begin is its local and carry kernels with no gradient
// arriving at the last state, whose carry out of chunk 0 is d_initial_state; its end adds the gradient g
// that does arrive into the carries, carry_in[c] += (prod_{c' > c} decay_c') * g, and runs the chunk and
// reduce kernels. Each half costs what it costs in the one-call op, plus one pass over the states.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

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
// Starts from the initial state (i is its index too) or zero. kIncoming (the split forward's end): the
// saved states are already carried from a zero start, and the initial state h0 is added to them through
// the decays, state[c] += (prod_{c' <= c} decay_c') * h0 (the states are linear in h0).
template <bool kDocs, bool kIncoming>
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
  // The state carried in; with kIncoming, h0 times the decays so far.
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
        if constexpr (kIncoming) {
          h *= chunk_decay<kDocs>(A2, tile_sum[j]);
          state[j * state_stride] = local[j] + h;
        } else {
          h = fmaf(chunk_decay<kDocs>(A2, tile_sum[j]), h, local[j]);
          state[j * state_stride] = h;
        }
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

// The one-call forward in a single pass over the sequence (forward_pass_kernel). A block owns 32
// channels of one sequence for its whole length: lane l the channel, warp w its states 4w .. 4w+3, so the
// 16 exponentials of a (token, channel) are formed once, against twice in the chunked local + output
// kernels, and 4 warps share the work of one channel. Tiles of kPassTile tokens are staged in shared
// memory (B, C rows and, per channel, softplus(delta + bias), delta * u, u, z), the next tile's global
// loads in flight in registers while the current one is scanned; each warp leaves its 4-state share of
// y per token, and after a barrier every thread adds the shares of kPassTile / 4 tokens, the D skip and
// the gate, and writes out. The state is written at every chunk's last token (chunk_states, as the chunked
// kernels leave them). Parallel over batch * dim / 32 blocks only: the training shapes have thousands.
constexpr int kPassWarps = 4;
constexpr int kPassStates = kState / kPassWarps;          // states of a channel per thread
constexpr int kPassTile = 32;                             // tokens staged at a time
constexpr int kPassTokens = kPassTile / kPassWarps;       // tokens a thread stages and reduces per tile
constexpr int kPassGroup = 4;                             // tokens scanned together

struct alignas(16) PassTile {  // 16: its rows are read as float4, in both tiles
  float bc[kPassTile][2 * kState];  // B | C rows
  float dt[kPassTile][32];          // softplus(delta + bias)
  float du[kPassTile][32];          // dt * u
  __nv_bfloat16 u[kPassTile][32], z[kPassTile][32];
  uint32_t starts;  // bit t: a document starts at token t (kPassTile == 32 bits)
};
static_assert(kPassTile == 32, "one bit of PassTile::starts per token");
struct PassShared {
  PassTile tiles[2];                  // the tile being scanned and the next
  float y[kPassWarps][kPassTile][32];  // each warp's share of y
};

// A thread's share of a tile's global loads: tokens w, w + 4, ... (its warp w), column or channel its lane.
struct PassLoads {
  __nv_bfloat16 bc[kPassTokens], u[kPassTokens], delta[kPassTokens], z[kPassTokens];
  bool start = false;
};

// Loads the tile whose first row (b * len + first token) is row0 and which holds count tokens; bc_column
// is this lane's column of the B | C rows.
template <bool kDocs>
__device__ __forceinline__ PassLoads pass_load(const ScanArgs& a, const __nv_bfloat16* bc_column, int64_t row0,
                                               int count, int d, bool active) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
  const int64_t row = row0 + w;
  const __nv_bfloat16* bc = bc_column + row * a.bc_stride;
  const __nv_bfloat16* u = a.u + row * a.dim + d;
  const __nv_bfloat16* delta = a.delta + row * a.dim + d;
  const __nv_bfloat16* z = a.z + row * a.z_stride + d;
  PassLoads r;
#pragma unroll
  for (int k = 0; k < kPassTokens; ++k) {
    const bool inside = w + kPassWarps * k < count;
    r.bc[k] = inside ? __ldg(bc) : zero;
    r.u[k] = inside && active ? __ldg(u) : zero;
    r.delta[k] = inside && active ? __ldg(delta) : zero;
    r.z[k] = inside && active ? __ldg(z) : zero;
    bc += kPassWarps * a.bc_stride;
    u += kPassWarps * a.dim;
    delta += kPassWarps * a.dim;
    z += kPassWarps * a.z_stride;
  }
  if (kDocs && w == 0 && lane < count) r.start = __ldg(a.doc_start + row0 + lane) == row0 % a.len + lane;
  return r;
}

template <bool kDocs>
__device__ __forceinline__ void pass_store(const PassLoads& r, float bias, PassTile& tile) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < kPassTokens; ++k) {
    const int t = w + kPassWarps * k;
    const float dt = softplus(__bfloat162float(r.delta[k]) + bias);
    tile.bc[t][lane] = __bfloat162float(r.bc[k]);
    tile.dt[t][lane] = dt;
    tile.du[t][lane] = dt * __bfloat162float(r.u[k]);
    tile.u[t][lane] = r.u[k];
    tile.z[t][lane] = r.z[k];
  }
  if (kDocs && w == 0) {
    const uint32_t starts = __ballot_sync(0xffffffffu, r.start);
    if (lane == 0) tile.starts = starts;
  }
}

template <bool kDocs>
__global__ void __launch_bounds__(kPassWarps * 32)
    forward_pass_kernel(ScanArgs a, float* chunk_states, __nv_bfloat16* out) {
  extern __shared__ __align__(16) unsigned char pass_memory[];
  PassShared& shared = *reinterpret_cast<PassShared*>(pass_memory);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t channel_blocks = (a.dim + 31) / 32;
  const int64_t b = blockIdx.x / channel_blocks;
  const int d = int(blockIdx.x % channel_blocks) * 32 + lane;
  const bool active = d < a.dim;
  const int first_state = kPassStates * w;
  float A2[kPassStates], h[kPassStates];
#pragma unroll
  for (int n = 0; n < kPassStates; ++n) {
    A2[n] = active ? __ldg(a.A + int64_t(d) * kState + first_state + n) * kLog2e : 0.0f;
    h[n] = active && a.initial_state != nullptr ? __ldg(a.initial_state + (b * a.dim + d) * kState + first_state + n)
                                                : 0.0f;
  }
  const float bias = active ? __ldg(a.delta_bias + d) : 0.0f;
  const float Dskip = active && a.Dskip != nullptr ? __ldg(a.Dskip + d) : 0.0f;

  const __nv_bfloat16* bc_column = lane < kState ? a.B + lane : a.C + (lane - kState);
  const int64_t first_row = b * a.len, tiles = (a.len + kPassTile - 1) / kPassTile;
  auto tile_count = [&](int64_t k) { return int(min(int64_t(kPassTile), a.len - k * kPassTile)); };
  PassLoads next = pass_load<kDocs>(a, bc_column, first_row, tile_count(0), d, active);
  pass_store<kDocs>(next, bias, shared.tiles[0]);
  if (tiles > 1) next = pass_load<kDocs>(a, bc_column, first_row + kPassTile, tile_count(1), d, active);
  __syncthreads();
  int64_t chunk = 0, chunk_last = min(a.chunk_len, a.len) - 1;  // the token whose state chunk_states keeps next
  for (int64_t k = 0; k < tiles; ++k) {
    const PassTile& tile = shared.tiles[k & 1];
    const int64_t t0 = k * kPassTile;
    const int count = tile_count(k);
    int tile_chunk_last = int(min(chunk_last - t0, int64_t(kPassTile)));  // kPassTile: not in this tile
    const uint32_t starts = kDocs ? tile.starts : 0u;
    // kPassGroup tokens at a time: their loads and their exponentials, which do not depend on the state,
    // issue together ahead of the chain of state updates. The last tile's rows past count hold zeros for
    // u, B and C: stepping through them changes neither a saved state nor an output.
    for (int t_group = 0; t_group < count; t_group += kPassGroup) {
      float dt[kPassGroup], du[kPassGroup], decay[kPassGroup][kPassStates];
      float4 B[kPassGroup], C[kPassGroup];
#pragma unroll
      for (int j = 0; j < kPassGroup; ++j) {
        const int t = t_group + j;
        dt[j] = tile.dt[t][lane];
        du[j] = tile.du[t][lane];
        B[j] = *reinterpret_cast<const float4*>(&tile.bc[t][first_state]);
        C[j] = *reinterpret_cast<const float4*>(&tile.bc[t][kState + first_state]);
      }
#pragma unroll
      for (int j = 0; j < kPassGroup; ++j)
#pragma unroll
        for (int n = 0; n < kPassStates; ++n) decay[j][n] = exp2_approx(dt[j] * A2[n]);
#pragma unroll
      for (int j = 0; j < kPassGroup; ++j) {
        const int t = t_group + j;
        if (kDocs && (starts >> t & 1u)) {
#pragma unroll
          for (int n = 0; n < kPassStates; ++n) h[n] = 0.0f;
        }
        h[0] = fmaf(decay[j][0], h[0], B[j].x * du[j]);
        h[1] = fmaf(decay[j][1], h[1], B[j].y * du[j]);
        h[2] = fmaf(decay[j][2], h[2], B[j].z * du[j]);
        h[3] = fmaf(decay[j][3], h[3], B[j].w * du[j]);
        shared.y[w][t][lane] = fmaf(C[j].w, h[3], fmaf(C[j].z, h[2], fmaf(C[j].y, h[1], C[j].x * h[0])));
        if (t == tile_chunk_last) {
          if (active)
            *reinterpret_cast<float4*>(chunk_states + state_index(a, b, chunk, d) + first_state) =
                make_float4(h[0], h[1], h[2], h[3]);
          ++chunk;
          chunk_last = min(chunk_last + a.chunk_len, a.len - 1);
          tile_chunk_last = int(min(chunk_last - t0, int64_t(kPassTile)));
        }
      }
    }
    __syncthreads();  // every warp's share of y is in
#pragma unroll
    for (int j = 0; j < kPassTokens; ++j) {
      const int t = w + kPassWarps * j;
      if (t < count && active) {
        float y = shared.y[0][t][lane] + shared.y[1][t][lane] + shared.y[2][t][lane] + shared.y[3][t][lane];
        y = fmaf(Dskip, __bfloat162float(tile.u[t][lane]), y);
        const float z = __bfloat162float(tile.z[t][lane]);
        out[(b * a.len + t0 + t) * a.out_stride + d] = __float2bfloat16_rn(y * (z * sigmoid(z)));
      }
    }
    if (k + 1 < tiles) {  // the other buffer's last readers finished before the previous barrier
      pass_store<kDocs>(next, bias, shared.tiles[(k + 1) & 1]);
      if (k + 2 < tiles)
        next = pass_load<kDocs>(a, bc_column, first_row + (k + 2) * kPassTile, tile_count(k + 2), d, active);
    }
    __syncthreads();
  }
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
// (P_t = 0 from a document start on). It also walks the states from the saved start state, writing the
// checkpoints.
template <bool kDocs>
__global__ void __launch_bounds__(kChannels, 4)
    backward_local_kernel(ScanArgs a, const float* chunk_states, const __nv_bfloat16* dout, BackwardWorkspace w) {
  __shared__ __align__(16) float rows[kTile][2 * kState];
  __shared__ bool starts[kTile];
  const ChunkBlock blk = chunk_block(a);
  const Channel ch = load_channel(a, blk.dim_block * kChannels + threadIdx.x);
  float h[kState], decay_product[kState], carry[kState];
  load_chunk_start(a, chunk_states, blk, ch, h);
#pragma unroll
  for (int n = 0; n < kState; ++n) {
    decay_product[n] = 1.0f;
    carry[n] = 0.0f;
  }
  float sumdelta = 0.0f;
  bool restarted = false;
  constexpr unsigned kIn = kInB | kInC | kInU | kInZ | kInDout | kInStartsIf<kDocs>;
  walk_chunk<kGroup, kIn>(
      a, blk, ch, dout, rows, starts,
      [&](int64_t t, const Tokens<kGroup>& x, int k, const float* bc_row, bool starts_here) {
        const int local_t = int(t - blk.t0);
        if (local_t % kSegment == 0 && local_t > 0 && ch.active) {
#pragma unroll
          for (int n = 0; n < kState; ++n)
            w.checkpoints[checkpoint_index(a, w, blk.b, blk.c, local_t / kSegment - 1, n, ch.d)] = h[n];
        }
        float B[kState], C[kState];
        load_row(bc_row, B);
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
          h[n] = fmaf(decay, h[n], B[n] * du);
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

// The per-token dB, dC contributions of a warp's 32 channels go through shared memory to be summed over
// the channels: each lane writes its 32 values as a row (float4 stores), then lane j adds column j. The
// padding of 4 floats keeps both free of bank conflicts: a quarter-warp's 16-byte stores cover all 32
// banks, and the 32 lanes of a column load hit 32 different banks.
constexpr int kSumsStride = 2 * kState + 4;

// The reverse step at one token (CPU backward, same names): updates dh to the carry into the previous
// token, returns du, ddelta, dz through the references and, as its value, this lane's share of the warp's
// token sums: lane l < 16 gets sum over the warp of dB_t[l], lane 16 + n gets that of dC_t[n]. warp_rows:
// the warp's rows for those sums, [32][kSumsStride].
__device__ __forceinline__ float backward_token(const Channel& ch, const float (&h_prev)[kState], float (&dh)[kState],
                                                const float* bc_row, float u, float dt, float pre, float z,
                                                float dout, int lane, float (*warp_rows)[kSumsStride], float& du_out,
                                                float& ddelta_out, float& dz_out) {
  float B[kState], C[kState];
  load_row(bc_row, B);
  load_row(bc_row + kState, C);
  const float du = dt * u;
  const float sig_z = sigmoid(z);
  const float dy = dout * (z * sig_z);
  float y = 0.0f, dh_B = 0.0f, dh_Aa = 0.0f;
  float dB_t[kState], dC_t[kState];  // this channel's contributions
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
    dB_t[n] = dh_t * du;
    dC_t[n] = dy * h_n;
  }
  float4* row = reinterpret_cast<float4*>(warp_rows[lane]);
#pragma unroll
  for (int q = 0; q < kState / 4; ++q) {
    row[q] = make_float4(dB_t[4 * q], dB_t[4 * q + 1], dB_t[4 * q + 2], dB_t[4 * q + 3]);
    row[kState / 4 + q] = make_float4(dC_t[4 * q], dC_t[4 * q + 1], dC_t[4 * q + 2], dC_t[4 * q + 3]);
  }
  __syncwarp();
  float sum = 0.0f;
#pragma unroll
  for (int r = 0; r < 32; ++r) sum += warp_rows[r][lane];
  __syncwarp();  // every lane has read its column before the next token's rows are written
  y = fmaf(ch.Dskip, u, y);
  du_out = fmaf(dt, dh_B, dy * ch.Dskip);
  ddelta_out = sigmoid(pre) * fmaf(u, dh_B, kLn2 * dh_Aa);  // A = A2 * ln 2
  dz_out = dout * y * sig_z * (1.0f + z * (1.0f - sig_z));
  return sum;
}

template <bool kDocs>
__global__ void __launch_bounds__(kChannels, 3)
    backward_chunk_kernel(ScanArgs a, const float* chunk_states, const __nv_bfloat16* dout, BackwardWorkspace w,
                          Gradients g) {
  __shared__ __align__(16) float rows[kSegment][2 * kState];
  __shared__ bool starts[kSegment];
  __shared__ float warp_sums[2][kRecompute][kWarps][2 * kState];  // double-buffered: one barrier per window
  __shared__ __align__(16) float lane_sums[kWarps][32][kSumsStride];
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
                                                            x.pre[s], x.z[s], x.dout[s], lane, lane_sums[warp], du,
                                                            ddelta, dz);
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

// The forward's begin, after its carry: one thread per (batch, channel, state) as the forward carry, i
// indexing final_state and decay. final_state = the last chunk's end state from a zero start, decay = the
// product of the chunk decays (1 for an empty sequence, whose final state is the initial one).
template <bool kDocs>
__global__ void __launch_bounds__(kFlatThreads)
    zero_start_final_kernel(ScanArgs a, const float* sumdelta, const float* chunk_states, float* final_state,
                            float* decay) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.batch * a.dim * kState) return;
  const int n = int(i % kState), d = int(i / kState % a.dim);
  const int64_t b = i / (a.dim * kState);
  const float A2 = __ldg(a.A + int64_t(d) * kState + n) * kLog2e;
  const float* sum = sumdelta + sumdelta_index(a, b, 0, d);
  float product = 1.0f;
#pragma unroll 8
  for (int64_t c = 0; c < a.num_chunks; ++c) product *= chunk_decay<kDocs>(A2, __ldg(sum + c * a.dim));
  final_state[i] = a.num_chunks > 0 ? chunk_states[state_index(a, b, a.num_chunks - 1, d) + n] : 0.0f;
  decay[i] = product;
}

// The backward's end: the carries into each chunk's last token, computed with no gradient arriving at
// h_{len-1}, receive that gradient g through the decays of the chunks after it: carry_in[c] +=
// (prod_{c' > c} decay_c') * g. One thread per (batch, state, channel) as the backward carry.
template <bool kDocs>
__global__ void __launch_bounds__(kFlatThreads)
    incoming_grad_kernel(ScanArgs a, BackwardWorkspace w, const float* d_final_state) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.batch * kState * a.dim) return;
  const int d = int(i % a.dim), n = int(i / a.dim % kState);
  const int64_t b = i / (a.dim * kState);
  const float A2 = __ldg(a.A + int64_t(d) * kState + n) * kLog2e;
  float carried = __ldg(d_final_state + (b * a.dim + d) * kState + n);  // g times the decays so far
  for (int64_t c = a.num_chunks - 1; c >= 0; --c) {
    w.carry[carry_index(a, b, c, n, d)] += carried;
    carried *= chunk_decay<kDocs>(A2, w.sumdelta[sumdelta_index(a, b, c, d)]);
  }
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

// Runs launch(std::true_type) with document starts, launch(std::false_type) without: the two
// instantiations of every per-token kernel.
template <typename Launch>
void with_documents(const int32_t* doc_start, Launch&& launch) {
  if (doc_start != nullptr)
    launch(std::true_type{});
  else
    launch(std::false_type{});
}

void check_launch(const char* op, const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) SSMTUNE_CUDA_CHECK(status, (std::string(op) + " " + kernel + " launch").c_str());
}

// The forward's local and carry kernels: every chunk's end state from a.initial_state (or zero), and the
// chunks' delta sums in sumdelta.
template <bool kDocs>
void launch_forward_states(const ScanArgs& a, float* chunk_states, float* sumdelta, cudaStream_t st, const char* op) {
  if (a.num_chunks == 0) return;
  forward_local_kernel<kDocs><<<chunk_grid(a, op), kChannels, 0, st>>>(a, chunk_states, sumdelta);
  check_launch(op, "local");
  // A single chunk's local end state is already the true one, unless an initial state flows in.
  if (a.num_chunks > 1 || a.initial_state != nullptr) {
    forward_carry_kernel<kDocs, false><<<state_grid(a, op), kFlatThreads, 0, st>>>(a, sumdelta, chunk_states);
    check_launch(op, "carry");
  }
}

template <bool kDocs>
void launch_forward_output(const ScanArgs& a, const float* chunk_states, __nv_bfloat16* out, cudaStream_t st,
                           const char* op) {
  forward_output_kernel<kDocs><<<chunk_grid(a, op), kChannels, 0, st>>>(a, chunk_states, out);
  check_launch(op, "output");
}

// The backward's local and carry kernels: w.carry holds the dh carried into each chunk's last token, from
// d_final_state (or zero); d_initial_state (when not null) the gradient w.r.t. h_{-1}. A sequence of no
// tokens passes d_final_state straight through.
void launch_backward_carries(const ScanArgs& a, const float* chunk_states, const __nv_bfloat16* dout,
                             const BackwardWorkspace& w, const int32_t* doc_start, const float* d_final_state,
                             float* d_initial_state, cudaStream_t st, const char* op) {
  if (a.dim == 0 || (a.len == 0 && d_initial_state == nullptr)) return;
  with_documents(a.len > 0 ? doc_start : nullptr, [&](auto documents) {
    constexpr bool kDocs = decltype(documents)::value;
    if (a.len > 0) {
      backward_local_kernel<kDocs><<<chunk_grid(a, op), kChannels, 0, st>>>(a, chunk_states, dout, w);
      check_launch(op, "local");
    }
    backward_carry_kernel<kDocs><<<state_grid(a, op), kFlatThreads, 0, st>>>(a, w, d_final_state, d_initial_state);
    check_launch(op, "carry");
  });
}

// The backward's chunk and reduce kernels, from the carries in w: du, ddelta, dz, dB, dC.
void launch_backward_gradients(const ScanArgs& a, const float* chunk_states, const __nv_bfloat16* dout,
                               const BackwardWorkspace& w, const int32_t* doc_start, const Gradients& g,
                               __nv_bfloat16* dB, __nv_bfloat16* dC, cudaStream_t st, const char* op) {
  if (a.len > 0 && a.dim > 0) {
    with_documents(doc_start, [&](auto documents) {
      backward_chunk_kernel<decltype(documents)::value><<<chunk_grid(a, op), kChannels, 0, st>>>(a, chunk_states,
                                                                                                   dout, w, g);
    });
    check_launch(op, "chunk");
  }
  // With dim == 0 there are no partial sums and dB, dC are written as zeros, as the CPU reference does.
  const int64_t rows = a.batch * a.len;
  if (rows == 0) return;
  const unsigned reduce_blocks = grid_size((rows * 2 * kState + kFlatThreads - 1) / kFlatThreads, op);
  reduce_bc_kernel<<<reduce_blocks, kFlatThreads, 0, st>>>(w.partials, a.dim_blocks, rows, a.bc_stride, dB, dC);
  check_launch(op, "reduce");
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

namespace {

void check_out_stride(const cpu::SelectiveScanShape& s, int64_t out_row_stride, const char* op) {
  if (out_row_stride < s.dim)
    throw std::invalid_argument(std::string(op) + ": out_row_stride " + std::to_string(out_row_stride) +
                                " is smaller than dim " + std::to_string(s.dim));
}

// ScanForwardPath::automatic: the single pass takes its busiest SM's blocks times the length, so it needs
// enough blocks, spread evenly (one block per SM leaves each scheduler a single warp to issue from).
bool single_pass_fills_gpu(const ScanArgs& a) {
  int device = 0, sms = 0;
  SSMTUNE_CUDA_CHECK(cudaGetDevice(&device), "selective_scan_forward");
  SSMTUNE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "selective_scan_forward");
  const int64_t blocks = a.batch * ((a.dim + 31) / 32);
  const int64_t busiest = (blocks + sms - 1) / sms;  // blocks on the busiest SM
  return 2 * blocks >= 3 * int64_t(sms) && 4 * busiest * sms <= 5 * blocks;
}

}  // namespace

void selective_scan_forward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                            const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                            int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                            uint16_t* out, int64_t out_row_stride, float* chunk_states, void* workspace,
                            const int32_t* doc_start, const float* initial_state, void* stream,
                            ScanForwardPath path) {
  constexpr const char* kOp = "selective_scan_forward";
  check_shape(s, kOp);
  check_out_stride(s, out_row_stride, kOp);
  if (s.batch == 0 || s.len == 0 || s.dim == 0) return;
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, C, bc_row_stride, Dskip, z, z_row_stride, out_row_stride,
                               doc_start, initial_state);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool single_pass = path == ScanForwardPath::single_pass ||
                           (path == ScanForwardPath::automatic && single_pass_fills_gpu(a));
  with_documents(doc_start, [&](auto documents) {
    constexpr bool kDocs = decltype(documents)::value;
    if (single_pass) {
      constexpr auto kernel = forward_pass_kernel<kDocs>;
      constexpr int bytes = sizeof(PassShared);  // over the 48 KiB a block gets without asking
      SSMTUNE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), kOp);
      kernel<<<grid_size(a.batch * ((a.dim + 31) / 32), kOp), kPassWarps * 32, bytes, st>>>(a, chunk_states,
                                                                                              bf16(out));
      check_launch(kOp, "pass");
    } else {
      launch_forward_states<kDocs>(a, chunk_states, static_cast<float*>(workspace), st, kOp);
      launch_forward_output<kDocs>(a, chunk_states, bf16(out), st, kOp);
    }
  });
}

void selective_scan_forward_begin(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                  const float* delta_bias, const float* A, const uint16_t* B, int64_t bc_row_stride,
                                  float* chunk_states, void* workspace, const int32_t* doc_start, float* final_state,
                                  float* decay, void* stream) {
  constexpr const char* kOp = "selective_scan_forward_begin";
  check_shape(s, kOp);
  if (s.batch == 0 || s.dim == 0) return;
  // The states' reads only: u, delta, B (no C, z, Dskip, output), from a zero initial state.
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, nullptr, bc_row_stride, nullptr, nullptr, 0, s.dim,
                               doc_start, nullptr);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  float* sumdelta = static_cast<float*>(workspace);
  with_documents(doc_start, [&](auto documents) {
    constexpr bool kDocs = decltype(documents)::value;
    launch_forward_states<kDocs>(a, chunk_states, sumdelta, st, kOp);
    zero_start_final_kernel<kDocs><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(a, sumdelta, chunk_states,
                                                                               final_state, decay);
    check_launch(kOp, "final state");
  });
}

void selective_scan_forward_end(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                                int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                                uint16_t* out, int64_t out_row_stride, float* chunk_states, void* workspace,
                                const int32_t* doc_start, const float* initial_state, void* stream) {
  constexpr const char* kOp = "selective_scan_forward_end";
  check_shape(s, kOp);
  check_out_stride(s, out_row_stride, kOp);
  if (s.batch == 0 || s.len == 0 || s.dim == 0) return;
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, C, bc_row_stride, Dskip, z, z_row_stride, out_row_stride,
                               doc_start, initial_state);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  with_documents(doc_start, [&](auto documents) {
    constexpr bool kDocs = decltype(documents)::value;
    if (initial_state != nullptr) {
      forward_carry_kernel<kDocs, true><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(
          a, static_cast<const float*>(workspace), chunk_states);
      check_launch(kOp, "incoming state");
    }
    launch_forward_output<kDocs>(a, chunk_states, bf16(out), st, kOp);
  });
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
  launch_backward_carries(a, chunk_states, bf16(dout), w, doc_start, d_final_state, d_initial_state, st, kOp);
  launch_backward_gradients(a, chunk_states, bf16(dout), w, doc_start, {bf16(du), bf16(ddelta), bf16(dz)}, bf16(dB),
                            bf16(dC), st, kOp);
}

void selective_scan_backward_begin(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                   const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                                   int64_t bc_row_stride, const uint16_t* z, int64_t z_row_stride,
                                   const float* chunk_states, const uint16_t* dout, void* workspace,
                                   const int32_t* doc_start, const float* initial_state, float* d_initial_state,
                                   void* stream) {
  constexpr const char* kOp = "selective_scan_backward_begin";
  check_shape(s, kOp);
  if (s.batch == 0) return;
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, C, bc_row_stride, nullptr, z, z_row_stride, s.dim,
                               doc_start, initial_state);
  const BackwardWorkspace w = backward_workspace(workspace_layout(s), workspace);
  launch_backward_carries(a, chunk_states, bf16(dout), w, doc_start, nullptr, d_initial_state,
                          static_cast<cudaStream_t>(stream), kOp);
}

void selective_scan_backward_end(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                 const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                                 int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                                 const float* chunk_states, const uint16_t* dout, uint16_t* du, uint16_t* ddelta,
                                 uint16_t* dB, uint16_t* dC, uint16_t* dz, void* workspace, const int32_t* doc_start,
                                 const float* initial_state, const float* d_final_state, void* stream) {
  constexpr const char* kOp = "selective_scan_backward_end";
  check_shape(s, kOp);
  if (s.batch == 0) return;
  const ScanArgs a = scan_args(s, u, delta, delta_bias, A, B, C, bc_row_stride, Dskip, z, z_row_stride, s.dim,
                               doc_start, initial_state);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const BackwardWorkspace w = backward_workspace(workspace_layout(s), workspace);
  if (d_final_state != nullptr && a.len > 0 && a.dim > 0) {
    with_documents(doc_start, [&](auto documents) {
      incoming_grad_kernel<decltype(documents)::value><<<state_grid(a, kOp), kFlatThreads, 0, st>>>(a, w,
                                                                                                    d_final_state);
    });
    check_launch(kOp, "incoming gradient");
  }
  launch_backward_gradients(a, chunk_states, bf16(dout), w, doc_start, {bf16(du), bf16(ddelta), bf16(dz)}, bf16(dB),
                            bf16(dC), st, kOp);
}

}  // namespace ssmtune::cuda
