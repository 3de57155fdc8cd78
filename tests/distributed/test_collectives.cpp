// The MPI communicator, the gradient buckets and the same-job check as a job of 2 or 3 ranks (3: uneven
// pieces). Every result is compared with the sums computed here, exactly: the values are small integers,
// which float and double add without rounding in any order.
#include <array>
#include <cstring>
#include <numeric>

#include "distributed/fingerprint.h"
#include "distributed/gradient_buckets.h"
#include "distributed/mpi_communicator.h"
#include "framework/error.h"
#include "tests/distributed/mpi_job.h"

using namespace ssmtune;
using test::world;

namespace {

// Rank r's value of element j, before any collective.
double value(int rank, size_t j) { return static_cast<double>((rank + 1) * (static_cast<int>(j % 97) + 1)); }
// Its sum over the ranks.
double total(int ranks, size_t j) {
  double sum = 0;
  for (int r = 0; r < ranks; ++r) sum += value(r, j);
  return sum;
}

template <typename T>
std::vector<T> filled(int rank, size_t n) {
  std::vector<T> v(n);
  for (size_t j = 0; j < n; ++j) v[j] = static_cast<T>(value(rank, j));
  return v;
}

}  // namespace

TEST_CASE("MPI all-reduce, reduce-scatter, all-gather and broadcast, uneven pieces included") {
  Watchdog watchdog(world(), 60);
  MpiCommunicator comm(world(), watchdog);
  const int ranks = comm.size(), me = comm.rank();
  REQUIRE(ranks == world().size());

  std::vector<float> f = filled<float>(me, 1001);
  std::vector<double> d = filled<double>(me, 33);
  std::vector<int64_t> i = filled<int64_t>(me, 5);
  comm.all_reduce_sum(f.data(), f.size(), Element::f32);
  comm.all_reduce_sum(d.data(), d.size(), Element::f64);
  comm.all_reduce_sum(i.data(), i.size(), Element::i64);
  for (size_t j = 0; j < f.size(); ++j) REQUIRE(f[j] == total(ranks, j));
  for (size_t j = 0; j < d.size(); ++j) REQUIRE(d[j] == total(ranks, j));
  for (size_t j = 0; j < i.size(); ++j) REQUIRE(i[j] == total(ranks, j));

  // Pieces of different sizes, one of them empty.
  for (const std::vector<size_t>& counts : {std::vector<size_t>(ranks, 6), [&] {
         std::vector<size_t> c(ranks);
         for (int r = 0; r < ranks; ++r) c[r] = r == 1 ? 0 : 3 * r + 4;
         return c;
       }()}) {
    const size_t n = std::accumulate(counts.begin(), counts.end(), size_t{0});
    const size_t offset = std::accumulate(counts.begin(), counts.begin() + me, size_t{0});
    std::vector<float> scattered = filled<float>(me, n);
    comm.reduce_scatter_sum(scattered.data(), counts, Element::f32);
    for (size_t j = offset; j < offset + counts[me]; ++j) REQUIRE(scattered[j] == total(ranks, j));

    std::vector<uint8_t> gathered(n, 0xEE);
    for (size_t j = offset; j < offset + counts[me]; ++j) gathered[j] = static_cast<uint8_t>(value(me, j));
    comm.all_gather(gathered.data(), counts, Element::byte);
    size_t j = 0;
    for (int r = 0; r < ranks; ++r)
      for (size_t k = 0; k < counts[r]; ++k, ++j) REQUIRE(gathered[j] == static_cast<uint8_t>(value(r, j)));
  }

  std::vector<double> b = filled<double>(me, 17);
  comm.broadcast(b.data(), b.size(), Element::f64, ranks - 1);
  for (size_t j = 0; j < b.size(); ++j) REQUIRE(b[j] == value(ranks - 1, j));
  comm.barrier();
}

TEST_CASE("gradient buckets hold whole layers from the last one down and sum as one collective would") {
  Watchdog watchdog(world(), 60);
  MpiCommunicator comm(world(), watchdog);
  const int ranks = comm.size(), me = comm.rank();
  const std::vector<int64_t> sizes{5, 9, 3, 12, 7, 1};
  std::vector<FlatRange> layers;
  for (int64_t s : sizes) layers.push_back({layers.empty() ? 0 : layers.back().end, (layers.empty() ? 0 : layers.back().end) + s});
  const int64_t n = layers.back().end;

  // 14 floats per bucket: {5: 1, 4: 7} = 8, then 12 alone (12 + 3 > 14), {2: 3, 1: 9} = 12, then layer 0.
  GradientBuckets reduce(comm, layers, n, Element::f32, 14 * 4.0, GradientBuckets::Reduction::all_reduce);
  const std::vector<std::array<int64_t, 2>> expected{{4, 5}, {3, 3}, {1, 2}, {0, 0}};
  REQUIRE(reduce.buckets().size() == expected.size());
  for (size_t b = 0; b < expected.size(); ++b) {
    CHECK(reduce.buckets()[b].first_layer == expected[b][0]);
    CHECK(reduce.buckets()[b].last_layer == expected[b][1]);
    CHECK(reduce.buckets()[b].range == FlatRange{layers[expected[b][0]].begin, layers[expected[b][1]].end});
  }
  // A layer larger than a bucket makes a bucket of its own.
  GradientBuckets tiny(comm, layers, n, Element::f32, 1.0, GradientBuckets::Reduction::all_reduce);
  CHECK(tiny.buckets().size() == sizes.size());

  // Every layer reported as the backward would, or only some (finish() issues the rest): whole sums.
  for (int reported : {6, 2, 0}) {
    std::vector<float> grads = filled<float>(me, static_cast<size_t>(n));
    reduce.start(grads.data());
    for (int64_t layer = 5; layer > 5 - reported; --layer) reduce.layer_done(layer);
    reduce.finish();
    comm.wait();
    for (size_t j = 0; j < grads.size(); ++j) REQUIRE(grads[j] == total(ranks, j));
  }

  // Reduce-scatter: each rank gets its shard of the sums, whatever the bucket boundaries.
  for (double bucket_bytes : {14 * 4.0, 1.0, 1e9}) {
    GradientBuckets scatter(comm, layers, n, Element::f32, bucket_bytes, GradientBuckets::Reduction::reduce_scatter);
    std::vector<float> grads = filled<float>(me, static_cast<size_t>(n));
    scatter.start(grads.data());
    for (int64_t layer = 5; layer >= 0; --layer) scatter.layer_done(layer);
    scatter.finish();
    comm.wait();
    const FlatRange shard = shard_range(n, {me, ranks});
    for (int64_t j = shard.begin; j < shard.end; ++j) REQUIRE(grads[j] == total(ranks, static_cast<size_t>(j)));
  }
}

TEST_CASE("ranks running something different all stop with one error naming the odd ones") {
  Watchdog watchdog(world(), 60);
  MpiCommunicator comm(world(), watchdog);
  const int ranks = comm.size();
  CHECK_NOTHROW(require_same_on_all_ranks(comm, {{"recipe", "same text", "no fix needed"}}));
  const std::string text = comm.rank() == ranks - 1 ? "other text" : "same text";
  try {
    require_same_on_all_ranks(comm, {{"model", "same", "-"}, {"recipe", text, "start every rank alike"}});
    FAIL_CHECK("expected an error");
  } catch (const Error& e) {
    const std::string expected = "rank " + std::to_string(ranks - 1) + " of " + std::to_string(ranks) +
                                 " runs a different recipe than rank 0: start every rank alike";
    CHECK(std::string(e.what()) == expected);
  }
}
