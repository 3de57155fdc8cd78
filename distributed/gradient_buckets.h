// The gradient reduction of a data-parallel step, bucket by bucket. The flat gradient buffer is laid
// out layer after layer (framework/lora.h) and the backward finishes the last layer first, so a bucket
// is a run of consecutive layers taken from the last layer down, of at most bucket_bytes (at least one
// layer): many small adapter tensors travel in few large messages, and a bucket's collective is issued
// as soon as the backward has produced all its layers, overlapping the backward of the layers below
// it (on NCCL; MPI over host memory reduces at once).
#pragma once
#include <cstdint>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/sharding.h"

namespace ssmtune {

class GradientBuckets {
 public:
  enum class Reduction {
    all_reduce,      // every rank gets the whole sum
    reduce_scatter,  // each rank gets the sum of its shard (shard_range(numel, {rank, size}))
  };
  struct Bucket {
    int64_t first_layer = 0, last_layer = 0;
    FlatRange range;
    std::vector<size_t> shard_counts;  // the bucket's elements in each rank's shard
  };

  // layer_ranges[i]: layer i's elements; consecutive ranges that cover a buffer of numel elements.
  GradientBuckets(Communicator& comm, const std::vector<FlatRange>& layer_ranges, int64_t numel, Element element,
                  double bucket_bytes, Reduction reduction);

  // Begins a step whose gradients accumulate in `grads`.
  void start(void* grads);
  // Layer `layer`'s gradients are final: its backward of the step's last micro-batch has been issued.
  void layer_done(int64_t layer);
  // Issues the buckets still waiting, as if every layer were done; comm.wait() then gives the result.
  void finish();

  const std::vector<Bucket>& buckets() const { return buckets_; }

 private:
  void issue(size_t bucket);

  Communicator& comm_;
  Element element_;
  Reduction reduction_;
  std::vector<Bucket> buckets_;              // in the order the backward completes them
  std::vector<size_t> bucket_of_layer_;
  std::vector<bool> layer_done_, issued_;
  std::vector<int64_t> layers_missing_;      // per bucket, in this step
  void* grads_ = nullptr;
};

}  // namespace ssmtune
