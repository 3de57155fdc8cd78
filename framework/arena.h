// A memory plan for one lifetime (frozen weights, adapters, activations): every buffer is declared by
// size first, then a single allocation backs them all and the declared pointers are filled in. Nothing
// is allocated after allocate(), so a training step never allocates.
#pragma once
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "framework/backend.h"
#include "framework/error.h"

namespace ssmtune {

class Arena {
 public:
  Arena(Backend& backend, std::string name) : backend_(&backend), name_(std::move(name)) {}
  Arena(Arena&& other) noexcept { *this = std::move(other); }
  Arena& operator=(Arena&& other) noexcept {
    std::swap(backend_, other.backend_);
    std::swap(name_, other.name_);
    std::swap(slots_, other.slots_);
    std::swap(bytes_, other.bytes_);
    std::swap(base_, other.base_);
    return *this;
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    if (base_) backend_->release(base_);
  }

  // Declares a buffer of `bytes`; *slot receives its address in allocate(). slot must stay valid.
  template <typename P>
  void add(P** slot, size_t bytes) {
    slots_.push_back({reinterpret_cast<void**>(const_cast<std::remove_const_t<P>**>(slot)), bytes_});
    bytes_ += padded(bytes);
  }
  // What a buffer of `bytes` takes in a plan: each starts on a kAlignment boundary.
  static size_t padded(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

  // An allocation failure names the plan and its size.
  void allocate() {
    try {
      base_ = static_cast<std::byte*>(backend_->allocate(bytes_));
    } catch (const std::exception& e) {
      throw Error(name_ + " (" + std::to_string(slots_.size()) + " buffers, " + std::to_string(bytes_ >> 20) +
                  " MiB in all): " + e.what());
    }
    backend_->fill_zero(base_, bytes_);
    for (const Slot& s : slots_) *s.target = base_ + s.offset;
  }

  size_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }

 private:
  static constexpr size_t kAlignment = 256;
  struct Slot {
    void** target;
    size_t offset;
  };
  Backend* backend_ = nullptr;
  std::string name_;
  std::vector<Slot> slots_;
  size_t bytes_ = 0;
  std::byte* base_ = nullptr;
};

}  // namespace ssmtune
