// Encoding throughput of the tokenizer on one core (a benchmark, not a test):
//   tokenizer_throughput [tokenizer.json] [text file]
// Defaults: the test fixture's tokenizer and the golden texts repeated to 8 MiB. Prints MB/s of input.
#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "framework/error.h"

int main(int argc, char** argv) {
  const std::string fixtures = std::string(SSMTUNE_SOURCE_DIR) + "/tests/data/fixtures/tokenizer/";
  try {
    auto tokenizer = ssmtune::Tokenizer::load(argc > 1 ? argv[1] : fixtures + "tokenizer.json");
    std::string sample;
    if (argc > 2) {
      std::ifstream in(argv[2], std::ios::binary);
      if (!in) ssmtune::fail("cannot open '{}'", argv[2]);
      sample.assign(std::istreambuf_iterator<char>(in), {});
    } else {
      std::ifstream in(fixtures + "golden.json");
      const auto golden = nlohmann::json::parse(in);
      for (const auto& c : golden.at("cases")) sample += c.at("text").get<std::string>() + "\n";
    }
    std::string text;
    while (text.size() < (8u << 20)) text += sample;
    const auto start = std::chrono::steady_clock::now();
    size_t tokens = tokenizer.encode(text).size();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << text.size() / 1e6 / seconds << " MB/s (" << text.size() << " bytes -> " << tokens
              << " tokens in " << seconds << " s)\n";
  } catch (const ssmtune::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
