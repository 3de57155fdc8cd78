// Shards of a flat buffer: for any length and any number of ranks they tile the buffer in rank order,
// differ in size by at most one element (the longer ones first), and the per-rank counts of any range
// are its intersections with the shards.
#include <algorithm>

#include "distributed/sharding.h"
#include "distributed/strategy.h"
#include "tests/catch.h"

using namespace ssmtune;

TEST_CASE("shards tile the buffer in rank order, the longer ones first") {
  for (int64_t n : {0, 1, 2, 5, 7, 64, 101, 1000003})
    for (int count : {1, 2, 3, 4, 8}) {
      INFO("n " << n << ", " << count << " shards");
      int64_t next = 0, previous_size = n + 1;
      for (int i = 0; i < count; ++i) {
        const FlatRange r = shard_range(n, {i, count});
        CHECK(r.begin == next);
        CHECK(r.size() <= previous_size);
        CHECK((r.size() == n / count || r.size() == n / count + 1));
        next = r.end;
        previous_size = r.size();
      }
      CHECK(next == n);
    }
  CHECK(shard_range(7, {0, 3}) == FlatRange{0, 3});
  CHECK(shard_range(7, {1, 3}) == FlatRange{3, 5});
  CHECK(shard_range(7, {2, 3}) == FlatRange{5, 7});
}

TEST_CASE("the per-shard counts of a range are its intersections with the shards") {
  const int64_t n = 103;
  for (int count : {1, 2, 3, 5})
    for (FlatRange range : {FlatRange{0, 103}, FlatRange{10, 11}, FlatRange{20, 70}, FlatRange{50, 50},
                            FlatRange{99, 103}}) {
      const std::vector<size_t> counts = shard_counts(range, n, count);
      REQUIRE(counts.size() == static_cast<size_t>(count));
      size_t total = 0;
      for (int i = 0; i < count; ++i) {
        const FlatRange shard = shard_range(n, {i, count});
        const int64_t expected = std::max<int64_t>(0, std::min(shard.end, range.end) - std::max(shard.begin, range.begin));
        CHECK(counts[i] == static_cast<size_t>(expected));
        total += counts[i];
      }
      CHECK(total == static_cast<size_t>(range.size()));
    }
}

TEST_CASE("each strategy's optimizer shard") {
  CHECK(optimizer_shard(ShardingStrategy::ddp, 2, 3).count == 1);
  CHECK(optimizer_shard(ShardingStrategy::ddp, 2, 3).index == 0);
  for (ShardingStrategy s : {ShardingStrategy::zero1, ShardingStrategy::zero2}) {
    CHECK(optimizer_shard(s, 2, 3).index == 2);
    CHECK(optimizer_shard(s, 2, 3).count == 3);
  }
  for (const char* name : {"ddp", "zero1", "zero2"}) CHECK(strategy_name(*strategy_from_name(name)) == name);
  CHECK(!strategy_from_name("fsdp"));
}
