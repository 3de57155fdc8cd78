// The base weights of one layer at a time, as the train step asks for them. With replicated weights a
// layer is simply MambaWeights::layer(i). With sharded base weights (distributed.shard_base_weights:
// each rank keeps 1/N of every layer's NF4 block, MambaWeights::projection_shard) a layer is
// all-gathered into one of two buffers, each of one layer's NF4 block (LayerNf4Layout):
//
//   acquire(i, next)  makes layer i's weights valid for the work issued on the backend from now on, and
//                     starts the all-gather of `next` into the other buffer, so that it travels while
//                     layer i computes. The forward acquires (0, 1), (1, 2), ...; the backward (L-1, L-2),
//                     ..., (0, -1), the same layer serving its recomputed forward and its backward (with
//                     memory.checkpoint_every, each segment's layers upwards first (from its second
//                     with memory.keep_layer_outputs), then downwards: TrainStep::backward_layers).
//                     Layers still held are not gathered again (the forward's last two serve the
//                     backward's first two, the backward's last two the next forward's first two).
//
// Ordering, all without blocking the host: the gather into a buffer starts after the compute issued so
// far (which includes the last use of the layer it replaces: the Communicator orders each collective
// after the backend's stream), and the compute issued after acquire(i) waits on the device for the
// gather of layer i alone (Communicator::order_compute_after), not for gradient buckets issued after
// it. complete() waits on the host, under the Watchdog, for every gather issued: TrainStep calls it at
// the end of each forward and backward, before anything blocks on the backend's stream, so that a dead
// rank ends in the Watchdog's error instead of a device that waits forever.
//
// Every rank must acquire the same layers in the same order (the gathers are collectives): every rank
// runs the same number of forward and backward passes (framework/evaluation.h pads its share).
// The gathered bytes are those of the unsharded weights, so a sharded job computes exactly what the
// same job with replicated weights does. The two buffers are a memory plan of their own, allocated once.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "distributed/communicator.h"
#include "framework/arena.h"
#include "framework/mamba_model.h"

namespace ssmtune {

class LayerWeights {
 public:
  // comm: the backend's communicator over the ranks that share the shards; needed only when
  // weights.projections_sharded(), and then of weights.projection_shard().count ranks.
  LayerWeights(Backend& backend, const MambaWeights& weights, Communicator* comm);

  // Layer `layer` for the work issued from now on; gathers `next` (-1: none) meanwhile.
  void acquire(int64_t layer, int64_t next);
  // The layer acquired last; fails (internal) for any other while sharded.
  const MambaLayerWeights& layer(int64_t i) const;
  // Waits on the host for the gathers issued so far (no-op without sharding).
  void complete();

  bool sharded() const { return weights_.projections_sharded(); }
  size_t buffer_bytes() const { return arena_.bytes(); }  // the two gather buffers (0 without sharding)

 private:
  struct Buffer {
    void* block = nullptr;         // one layer's NF4 block
    int64_t layer = -1;            // the layer it holds, -1: none
    uint64_t gather = 0;           // the collective that fills it, until compute is ordered after it
    MambaLayerWeights weights;     // layer's weights, projections in `block`
  };
  int find(int64_t layer) const;   // the buffer holding `layer`, or -1
  void gather(int64_t layer, int buffer);

  Backend& backend_;
  const MambaWeights& weights_;
  Communicator* comm_;
  Arena arena_;
  std::array<Buffer, 2> buffers_;
  std::vector<size_t> shard_counts_;  // bytes of each rank's shard of a block
  int current_ = -1;                  // the buffer of the layer acquired last
  int64_t acquired_ = -1;             // the layer acquired last
};

}  // namespace ssmtune
