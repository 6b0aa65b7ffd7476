// The doctest runner, compiled once into a static library and linked into
// every test executable (one executable per feature file).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
