#include "distributed/watchdog.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "framework/error.h"

namespace ssmtune {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr int kQueryTag = 1, kAnswerTag = 2;
constexpr int64_t kNoAnswer = -2;

// Short waits (a collective between two kernels) stay responsive; long ones (another rank writing a
// checkpoint) do not keep a core busy.
void pause(Clock::duration waited) {
  if (waited < 2ms) std::this_thread::yield();
  else if (waited < 100ms) std::this_thread::sleep_for(20us);
  else std::this_thread::sleep_for(500us);
}

}  // namespace

Watchdog::Watchdog(const ProcessGroup& group, double timeout_seconds)
    : rank_(group.rank()), size_(group.size()), timeout_(timeout_seconds) {
  if (!(timeout_seconds > 0)) fail("distributed.timeout_s must be positive, got {}", timeout_seconds);
  MPI_Comm_dup(group.comm(), &comm_);
}

Watchdog::~Watchdog() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
}

void Watchdog::wait(std::string_view what, const std::function<bool()>& done,
                    const std::function<void()>& on_timeout) {
  in_wait_ = waits_++;
  struct EndOfWait {
    int64_t& in_wait;
    ~EndOfWait() { in_wait = -1; }
  } end_of_wait{in_wait_};  // also when `done` throws (NCCL reports an error)
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(timeout_));
  while (!done()) {
    if (size_ > 1) answer_queries();
    const Clock::time_point now = Clock::now();
    if (now >= deadline) time_out(what, on_timeout);
    pause(now - start);
  }
}

void Watchdog::answer_queries() {
  for (;;) {
    int pending = 0;
    MPI_Status status;
    MPI_Iprobe(MPI_ANY_SOURCE, kQueryTag, comm_, &pending, &status);
    if (!pending) return;
    int64_t their_wait = 0;
    MPI_Recv(&their_wait, 1, MPI_INT64_T, status.MPI_SOURCE, kQueryTag, comm_, MPI_STATUS_IGNORE);
    const int64_t answer = in_wait_;
    MPI_Send(&answer, 1, MPI_INT64_T, status.MPI_SOURCE, kAnswerTag, comm_);  // 8 bytes: sent eagerly
  }
}

void Watchdog::time_out(std::string_view what, const std::function<void()>& on_timeout) {
  std::vector<int64_t> answers(static_cast<size_t>(size_), kNoAnswer);
  answers[rank_] = in_wait_;
  query_ = in_wait_;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    MPI_Request request;
    MPI_Isend(&query_, 1, MPI_INT64_T, r, kQueryTag, comm_, &request);
    MPI_Request_free(&request);  // a dead rank never receives it; query_ outlives the job
  }
  const Clock::time_point start = Clock::now();
  const auto grace = std::chrono::duration<double>(std::clamp(timeout_ / 4, 0.5, 5.0));
  while (Clock::now() - start < grace &&
         std::count(answers.begin(), answers.end(), kNoAnswer) > 0) {
    answer_queries();  // the others time out too, and ask this rank
    int pending = 0;
    MPI_Status status;
    MPI_Iprobe(MPI_ANY_SOURCE, kAnswerTag, comm_, &pending, &status);
    if (pending)
      MPI_Recv(&answers[status.MPI_SOURCE], 1, MPI_INT64_T, status.MPI_SOURCE, kAnswerTag, comm_, MPI_STATUS_IGNORE);
    else
      std::this_thread::sleep_for(1ms);
  }
  if (on_timeout) on_timeout();

  std::vector<int> silent;
  std::vector<std::string> waiting;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    if (answers[r] == kNoAnswer) silent.push_back(r);
    else waiting.push_back(fmt::format("rank {} at wait #{}", r, answers[r]));
  }
  const std::string head = fmt::format("{} (wait #{}) did not complete within distributed.timeout_s = {} s", what,
                                       in_wait_, timeout_);
  if (!silent.empty())
    fail("{}: no answer from rank{} {} (dead, hung, or busy outside the collectives for longer than the "
         "timeout){}{}; stopping the job",
         head, silent.size() > 1 ? "s" : "", fmt::join(silent, ", "), waiting.empty() ? "" : "; answered: ",
         fmt::join(waiting, ", "));
  fail("{}: every rank answered ({}), so none is dead: the ranks wait in different collectives, or the "
       "interconnect is stuck; stopping the job",
       head, fmt::join(waiting, ", "));
}

}  // namespace ssmtune
