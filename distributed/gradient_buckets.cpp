#include "distributed/gradient_buckets.h"

#include <algorithm>

#include "framework/error.h"

namespace ssmtune {

GradientBuckets::GradientBuckets(Communicator& comm, const std::vector<FlatRange>& layer_ranges, int64_t numel,
                                 Element element, double bucket_bytes, Reduction reduction)
    : comm_(comm), element_(element), reduction_(reduction) {
  if (!(bucket_bytes > 0)) fail("distributed.bucket_mb must be positive, got {} bytes", bucket_bytes);
  const int64_t layers = static_cast<int64_t>(layer_ranges.size());
  for (int64_t i = 0; i < layers; ++i)
    if (layer_ranges[i].begin != (i == 0 ? 0 : layer_ranges[i - 1].end) || layer_ranges[i].size() < 0)
      fail("internal: gradient layout: layer {} holds [{}, {}), not next to the layer before", i, layer_ranges[i].begin,
           layer_ranges[i].end);
  if (layers == 0 || layer_ranges.back().end != numel)
    fail("internal: gradient layout: the layers do not cover the buffer of {} elements", numel);

  const double element_bytes = static_cast<double>(element_size(element));
  bucket_of_layer_.resize(static_cast<size_t>(layers));
  for (int64_t last = layers - 1; last >= 0;) {
    int64_t first = last;
    double bytes = static_cast<double>(layer_ranges[last].size()) * element_bytes;
    while (first > 0 && bytes + static_cast<double>(layer_ranges[first - 1].size()) * element_bytes <= bucket_bytes)
      bytes += static_cast<double>(layer_ranges[--first].size()) * element_bytes;
    Bucket b;
    b.first_layer = first;
    b.last_layer = last;
    b.range = {layer_ranges[first].begin, layer_ranges[last].end};
    b.shard_counts = shard_counts(b.range, numel, comm.size());
    for (int64_t l = first; l <= last; ++l) bucket_of_layer_[l] = buckets_.size();
    buckets_.push_back(std::move(b));
    last = first - 1;
  }
  layer_done_.assign(static_cast<size_t>(layers), false);
  issued_.assign(buckets_.size(), false);
  layers_missing_.assign(buckets_.size(), 0);
}

void GradientBuckets::start(void* grads) {
  grads_ = grads;
  std::fill(layer_done_.begin(), layer_done_.end(), false);
  std::fill(issued_.begin(), issued_.end(), false);
  for (size_t b = 0; b < buckets_.size(); ++b) layers_missing_[b] = buckets_[b].last_layer - buckets_[b].first_layer + 1;
}

void GradientBuckets::layer_done(int64_t layer) {
  if (layer < 0 || layer >= static_cast<int64_t>(layer_done_.size()))
    fail("internal: gradient buckets: no layer {}", layer);
  if (layer_done_[layer]) return;
  layer_done_[layer] = true;
  const size_t b = bucket_of_layer_[layer];
  if (--layers_missing_[b] == 0) issue(b);
}

void GradientBuckets::finish() {
  for (size_t b = 0; b < buckets_.size(); ++b)
    if (!issued_[b]) issue(b);
}

void GradientBuckets::issue(size_t b) {
  if (!grads_) fail("internal: gradient buckets used before start()");
  issued_[b] = true;
  const Bucket& bucket = buckets_[b];
  void* first = static_cast<std::byte*>(grads_) + bucket.range.begin * element_size(element_);
  if (reduction_ == Reduction::all_reduce)
    comm_.all_reduce_sum(first, static_cast<size_t>(bucket.range.size()), element_);
  else
    comm_.reduce_scatter_sum(first, bucket.shard_counts, element_);
}

}  // namespace ssmtune
