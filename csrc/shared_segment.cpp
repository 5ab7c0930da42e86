#include "shared_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace kt_sft {
namespace {

std::runtime_error failure(const std::string& what, const std::string& path) {
  return std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

}  // namespace

SharedSegment::SharedSegment(const std::string& path, size_t bytes, bool create)
    : path_(path), bytes_(bytes), writable_(create) {
  if (bytes == 0) throw std::invalid_argument("SharedSegment " + path + ": size 0");
  const int fd = create ? ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600)
                        : ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw failure(create ? "cannot create" : "cannot open", path);
  struct stat st {};
  if (create && ::ftruncate(fd, off_t(bytes)) != 0) {
    const std::runtime_error err = failure("cannot size", path);
    ::close(fd);
    ::unlink(path.c_str());
    throw err;
  }
  if (!create && (::fstat(fd, &st) != 0 || size_t(st.st_size) != bytes)) {
    ::close(fd);
    throw std::runtime_error("shared expert store " + path + " is " + std::to_string(st.st_size) +
                             " bytes, expected " + std::to_string(bytes) + " (another run's file?)");
  }
  void* p = ::mmap(nullptr, bytes, create ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const std::runtime_error err = failure("cannot map", path);
    ::close(fd);
    if (create) ::unlink(path.c_str());
    throw err;
  }
  ::close(fd);
  ptr_ = p;
}

SharedSegment::~SharedSegment() {
  if (ptr_) ::munmap(ptr_, bytes_);
}

bool SharedSegment::unlink() { return ::unlink(path_.c_str()) == 0; }

}  // namespace kt_sft
