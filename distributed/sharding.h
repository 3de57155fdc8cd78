// How a flat buffer is split over ranks. The adapters' parameters, gradients and AdamW moments share
// one flat layout (framework/lora.h), so a shard is a contiguous range of it: rank r of N owns the r-th
// of N consecutive pieces, the first n % N of them one element longer (any N divides any buffer).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ssmtune {

// Elements [begin, end) of a flat buffer.
struct FlatRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const FlatRange&) const = default;
};

FlatRange intersect(FlatRange a, FlatRange b);  // empty (begin == end) when they do not overlap

// Shard `index` of `count` (ZeRO's partition), or the whole buffer when count is 1.
struct ShardIndex {
  int index = 0, count = 1;
};

// The range of shard s.index of s.count of a buffer of n elements.
FlatRange shard_range(int64_t n, ShardIndex s);

// How many elements of `range` fall into each of the `count` shards of a buffer of n elements, in shard
// order: the pieces are consecutive, so they are the per-rank counts of a reduce-scatter or
// all-gather over `range`.
std::vector<size_t> shard_counts(FlatRange range, int64_t n, int count);

}  // namespace ssmtune
