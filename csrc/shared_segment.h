// NOTE (kt-sft engine, SharedSegment: one host's packed experts in a named shared-memory file)
// Layout:    one file in a memory file system (/dev/shm by default; kt_sft/distributed.py names it), mapped
//            MAP_SHARED: the process that packs maps it read-write and each MoELayer adopts its page-aligned piece
//            (MoELayer::use_storage: panels, scales, channel scales; PackedWeights::storage_bytes), the other
//            processes of the host map the same file read-only and adopt the same pieces, already packed. The
//            host's RAM holds the experts once, whatever the number of processes.
// Algorithm: create: open(O_CREAT | O_EXCL, 0600), ftruncate to the size, mmap read-write; open: the existing file,
//            its size checked, mmap read-only. The descriptor is closed once mapped (the mapping keeps the file).
//            unlink() removes the name as soon as every process has mapped it, so nothing stays in the file system
//            after the processes end, however they end; the pages are freed with the last mapping.
// Invariants: owned through std::shared_ptr by every layer that adopted a piece of it: the mapping outlives them.
//            A read-only mapping makes a stray write fault instead of corrupting another process's weights.
#pragma once
#include <cstddef>
#include <string>

namespace kt_sft {

class SharedSegment {
 public:
  // create: a new file `path` of `bytes`, mapped read-write (an existing one is an error); else the existing file,
  // which must be `bytes` long, mapped read-only. Throws std::runtime_error naming the path and the reason.
  SharedSegment(const std::string& path, size_t bytes, bool create);
  ~SharedSegment();
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  char* data() const { return static_cast<char*>(ptr_); }
  size_t bytes() const { return bytes_; }
  bool writable() const { return writable_; }
  const std::string& path() const { return path_; }
  // Removes the file's name (the mapping stays valid); true when this call removed it.
  bool unlink();

 private:
  std::string path_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool writable_ = false;
};

}  // namespace kt_sft
