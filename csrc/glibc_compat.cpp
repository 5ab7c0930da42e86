// NOTE (kt-sft engine, the glibc floor of the built .so)
// setup.py links libstdc++ statically (LINK_FLAGS), so the .so needs no GLIBCXX version from the user's
// environment, only glibc. libstdc++.a of GCC 12 built on glibc >= 2.36 references arc4random (std::random_device,
// pulled in with the copy-on-write string instantiations; the engine never makes a random_device), which alone would
// raise that floor from glibc 2.34 to 2.36 (auditwheel: manylinux_2_36, excluding Ubuntu 22.04). This hidden
// definition satisfies the reference inside the .so; on older build boxes nothing refers to it.
#include <sys/random.h>

#include <cerrno>
#include <cstdlib>

extern "C" __attribute__((visibility("hidden"))) unsigned int arc4random() noexcept {
  unsigned int v;
  for (;;) {
    if (getrandom(&v, sizeof v, 0) == ssize_t(sizeof v)) return v;
    if (errno != EINTR) std::abort();  // no kernel entropy source (Linux < 3.17): never reached by the engine
  }
}
