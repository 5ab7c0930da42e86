// NOTE (kt-sft engine, Buffer: 64-byte aligned, grow-only memory)
// Layout:    one aligned_alloc'ed block, its size rounded up to 64 bytes.
// Algorithm: reserve(bytes) reallocates only when it must grow, and then does not keep the contents: every user
//            (the engine's scratch, a layer's panels and saved slots) rewrites what it reserved.
// Invariants: move-only; freed on destruction.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <new>

namespace kt_sft {

class Buffer {
 public:
  Buffer() = default;
  ~Buffer() { std::free(ptr_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
  void* reserve(size_t bytes) {  // contents are not kept when it grows
    if (bytes <= bytes_) return ptr_;
    std::free(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    const size_t rounded = (bytes + 63) / 64 * 64;
    ptr_ = std::aligned_alloc(64, rounded);
    if (!ptr_) throw std::bad_alloc();
    bytes_ = rounded;
    return ptr_;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace kt_sft
