// What a call throws as ssmtune::Error, for tests of user-facing messages ("" when nothing is thrown).
#pragma once
#include <string>

#include "framework/error.h"

namespace ssmtune::test {

template <typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace ssmtune::test
