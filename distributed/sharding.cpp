#include "distributed/sharding.h"

#include <algorithm>

#include "framework/error.h"

namespace ssmtune {

FlatRange intersect(FlatRange a, FlatRange b) {
  const int64_t begin = std::max(a.begin, b.begin), end = std::min(a.end, b.end);
  return begin < end ? FlatRange{begin, end} : FlatRange{begin, begin};
}

FlatRange shard_range(int64_t n, ShardIndex s) {
  if (s.count <= 0 || s.index < 0 || s.index >= s.count || n < 0)
    fail("internal: shard {} of {} of a buffer of {} elements", s.index, s.count, n);
  const int64_t base = n / s.count, extra = n % s.count;
  const int64_t begin = s.index * base + std::min<int64_t>(s.index, extra);
  return {begin, begin + base + (s.index < extra ? 1 : 0)};
}

std::vector<size_t> shard_counts(FlatRange range, int64_t n, int count) {
  std::vector<size_t> counts(static_cast<size_t>(count));
  for (int r = 0; r < count; ++r) counts[r] = static_cast<size_t>(intersect(range, shard_range(n, {r, count})).size());
  return counts;
}

}  // namespace ssmtune
