#include "framework/layer_weights.h"

#include "framework/error.h"

namespace ssmtune {

LayerWeights::LayerWeights(Backend& backend, const MambaWeights& weights, Communicator* comm)
    : backend_(backend),
      weights_(weights),
      comm_(comm),
      arena_(backend, "gathered base weights (two layers' NF4 projections)") {
  if (!sharded()) return;
  const ShardIndex shard = weights.projection_shard();
  if (comm == nullptr || comm->size() != shard.count || comm->rank() != shard.index)
    fail("internal: base weights sharded as shard {} of {} need the communicator of that rank among as many",
         shard.index, shard.count);
  for (Buffer& buffer : buffers_) arena_.add(&buffer.block, weights.nf4_layout().bytes);
  arena_.allocate();
  shard_counts_.assign(static_cast<size_t>(shard.count), weights.nf4_layout().shard_bytes());
}

int LayerWeights::find(int64_t layer) const {
  for (int b = 0; b < static_cast<int>(buffers_.size()); ++b)
    if (buffers_[b].layer == layer) return b;
  return -1;
}

void LayerWeights::gather(int64_t layer, int b) {
  Buffer& buffer = buffers_[b];
  const size_t shard_bytes = weights_.nf4_layout().shard_bytes();
  // The all-gather is in place: this rank's piece goes to its offset first.
  const size_t offset = static_cast<size_t>(weights_.projection_shard().index) * shard_bytes;
  backend_.copy(static_cast<std::byte*>(buffer.block) + offset, weights_.layer_nf4_shard(layer), shard_bytes);
  comm_->all_gather(buffer.block, shard_counts_, Element::byte);
  buffer.layer = layer;
  buffer.gather = comm_->collectives_issued();
  buffer.weights = weights_.layer_at(layer, buffer.block);
}

void LayerWeights::acquire(int64_t layer, int64_t next) {
  const int64_t layers = weights_.config().n_layer;
  if (layer < 0 || layer >= layers || next < -1 || next >= layers || next == layer)
    fail("internal: acquiring layer {} (next {}) of {}", layer, next, layers);
  acquired_ = layer;
  if (!sharded()) return;
  int b = find(layer);
  if (b < 0) {
    b = buffers_[0].layer == next ? 1 : 0;  // keep `next` where it is already held
    gather(layer, b);
  }
  comm_->order_compute_after(buffers_[b].gather);
  buffers_[b].gather = 0;  // compute is ordered after it from now on
  current_ = b;
  if (next >= 0 && find(next) < 0) gather(next, 1 - b);
}

const MambaLayerWeights& LayerWeights::layer(int64_t i) const {
  if (i != acquired_) fail("internal: the weights of layer {} used while layer {} is acquired", i, acquired_);
  return sharded() ? buffers_[current_].weights : weights_.layer(i);
}

void LayerWeights::complete() {
  if (sharded()) comm_->wait();
}

}  // namespace ssmtune
