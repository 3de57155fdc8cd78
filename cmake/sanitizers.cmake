# Builds for hostile input (README, "Hostile input"); both are for the CPU build.
#   SSMTUNE_SANITIZE=address,undefined  compiles and links all C/C++ code with those sanitizers, at -O1
#                                       with line tables so reports name file:line; any UBSan finding
#                                       aborts instead of printing and carrying on.
#   SSMTUNE_FUZZ=ON                     (clang only) also adds libFuzzer's coverage instrumentation and
#                                       builds the fuzz targets of tests/fuzz; it implies
#                                       SSMTUNE_SANITIZE=address,undefined unless set otherwise.
# One build with both serves the sanitized test suite and the fuzzers (tests/hardening.sh).
set(SSMTUNE_SANITIZE "" CACHE STRING "sanitizers to build with, e.g. address,undefined")
option(SSMTUNE_FUZZ "build the libFuzzer targets of tests/fuzz (needs clang)" OFF)

if(SSMTUNE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "SSMTUNE_FUZZ needs clang's libFuzzer: configure with "
                        "-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++")
  endif()
  if(NOT SSMTUNE_SANITIZE)
    set(SSMTUNE_SANITIZE address,undefined)
  endif()
  add_compile_options($<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=fuzzer-no-link>)
endif()

if(SSMTUNE_SANITIZE)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    set(ssmtune_line_tables -gline-tables-only)
  else()
    set(ssmtune_line_tables -g1)  # gcc's nearest: line tables and little else
  endif()
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=${SSMTUNE_SANITIZE};-fno-sanitize-recover=all;-fno-omit-frame-pointer;-O1;${ssmtune_line_tables}>")
  add_link_options(-fsanitize=${SSMTUNE_SANITIZE})
  message(STATUS "ssmtune: sanitizers ${SSMTUNE_SANITIZE}, fuzz targets ${SSMTUNE_FUZZ}")
endif()
