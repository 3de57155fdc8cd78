// For the test runners with a main of their own (those that report a test as skipped where it cannot
// run): Catch2's session, v2 (Debian 12) or v3 (the GPU machine), and whether the runner is only asked
// to list its tests. Include it in the runner's one source file: with v2 it compiles Catch2 there.
#pragma once
#include <cstring>

#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

namespace ssmtune::test {

// catch_discover_tests lists the tests at build time (--list-tests, --list-test-names-only), which
// must work wherever the tests themselves would be skipped.
inline bool listing_tests(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--list", 6) == 0) return true;
  return false;
}

}  // namespace ssmtune::test
