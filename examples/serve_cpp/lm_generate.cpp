// Serves a language model trained by `lstm-ext train` from C++, without Python: loads the
// AOTInductor package `lstm-ext export --format aoti` wrote, feeds it a prompt, then generates
// one character at a time, carrying the LSTM state from call to call. Greedy decoding (the most
// likely character each step, never the unknown token), so its text equals
// `lstm-ext generate --temperature 0` for the same checkpoint.
//
//   lm_generate MODEL.pt2 MODEL.pt2.vocab "PROMPT" TOKENS [--scores]
//
// --scores also writes each chosen character's logit to stderr, one per line (what a test
// compares with Python's, since a logit shows a lost state where greedy text may not).
//
// The op library (lstm_ext_ops) is linked in: the package calls lstm_ext's ops, which must be
// registered in the process before it runs.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

// The vocabulary file: a first line "layers state_size hidden_size", then one token per line,
// its UTF-8 bytes in hex (so that newlines and any other character survive), id = line - 1.
struct Vocabulary {
  int64_t layers = 0, state_size = 0, hidden_size = 0;
  std::vector<std::string> tokens;
  std::map<std::string, int64_t> ids;
};

std::string from_hex(const std::string& hex) {
  std::string bytes;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    bytes.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return bytes;
}

Vocabulary read_vocabulary(const std::string& path) {
  std::ifstream file(path);
  TORCH_CHECK(file, "cannot read the vocabulary file ", path);
  Vocabulary vocabulary;
  std::string line;
  std::getline(file, line);
  std::istringstream(line) >> vocabulary.layers >> vocabulary.state_size >> vocabulary.hidden_size;
  TORCH_CHECK(vocabulary.layers > 0, path, " does not start with 'layers state hidden'");
  while (std::getline(file, line)) {
    vocabulary.ids.emplace(from_hex(line), static_cast<int64_t>(vocabulary.tokens.size()));
    vocabulary.tokens.push_back(from_hex(line));
  }
  return vocabulary;
}

// The characters of a UTF-8 string (a character-level model's tokens).
std::vector<std::string> characters(const std::string& text) {
  std::vector<std::string> out;
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    const size_t length = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
    out.push_back(text.substr(i, length));
    i += length;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const bool scores = argc == 6 && std::string(argv[5]) == "--scores";
  if (argc != 5 && !scores) {
    std::fprintf(stderr, "usage: %s MODEL.pt2 MODEL.pt2.vocab PROMPT TOKENS [--scores]\n",
                 argv[0]);
    return 2;
  }
  try {
    const Vocabulary vocabulary = read_vocabulary(argv[2]);
    const std::string prompt = argv[3];
    const int64_t count = std::atoll(argv[4]);
    constexpr int64_t kUnknown = 0;  // the vocabulary's first token, never emitted

    std::vector<int64_t> prompt_ids;
    for (const std::string& character : characters(prompt.empty() ? "\n" : prompt)) {
      const auto found = vocabulary.ids.find(character);
      prompt_ids.push_back(found == vocabulary.ids.end() ? kUnknown : found->second);
    }

    c10::InferenceMode inference;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const auto ids = at::tensor(prompt_ids, at::kLong).view({-1, 1});  // (steps, batch 1)
    std::vector<at::Tensor> outputs =
        loader.run({ids, at::zeros({vocabulary.layers, 1, vocabulary.state_size}),
                    at::zeros({vocabulary.layers, 1, vocabulary.hidden_size})});
    std::cout << prompt;
    for (int64_t n = 0; n < count; ++n) {
      at::Tensor last = outputs[0][-1][0].clone();  // logits of the last step
      last[kUnknown] = -std::numeric_limits<float>::infinity();
      const int64_t next = last.argmax().item<int64_t>();
      if (scores) std::fprintf(stderr, "%.9g\n", last[next].item<double>());
      std::cout << vocabulary.tokens.at(next);
      outputs = loader.run({at::full({1, 1}, next, at::kLong), outputs[1], outputs[2]});
    }
    std::cout << std::endl;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "lm_generate: %s\n", error.what());
    return 1;
  }
  return 0;
}
