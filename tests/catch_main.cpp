// Catch2 v2 needs the runner compiled into one translation unit; v3 ships it as Catch2WithMain.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
