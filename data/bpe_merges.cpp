#include "data/bpe_merges.h"

#include <functional>
#include <queue>
#include <tuple>

namespace ssmtune {

bool BpeMerges::add(uint32_t left, uint32_t right, uint32_t merged) {
  return merges_.emplace(key(left, right), Merge{static_cast<uint32_t>(merges_.size()), merged}).second;
}

const BpeMerges::Merge* BpeMerges::find(uint32_t left, uint32_t right) const {
  auto it = merges_.find(key(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeMerges::apply(std::vector<uint32_t>& word) const {
  if (word.size() < 2) return;
  // Symbols form a linked list over `word`; a merged-away symbol is marked dead.
  const int n = static_cast<int>(word.size());
  std::vector<int> prev(n), next(n);
  std::vector<bool> dead(n, false);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  // Candidates (rank, left position, merged id); stale ones are skipped when popped.
  using Candidate = std::tuple<uint32_t, int, uint32_t>;
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    if (const Merge* m = find(word[left], word[next[left]])) heap.emplace(m->rank, left, m->merged);
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    auto [rank, left, merged] = heap.top();
    heap.pop();
    if (dead[left] || next[left] < 0) continue;
    const Merge* current = find(word[left], word[next[left]]);
    if (!current || current->merged != merged) continue;  // the pair changed since it was pushed
    int right = next[left];
    word[left] = merged;
    dead[right] = true;
    next[left] = next[right];
    if (next[right] >= 0) prev[next[right]] = left;
    push(prev[left]);
    push(left);
  }
  size_t out = 0;
  for (int i = 0; i >= 0; i = next[i]) word[out++] = word[i];
  word.resize(out);
}

}  // namespace ssmtune
