// Writes a TensorBoard log the way a crashed and resumed training run does, for
// tensorboard_reader_test.py to read with TensorBoard's own loader:
//
//   attempt 1 (fresh, at T):          config text at 0; scalars at 10..50; grids at 20, 40; then
//                                     it "crashes" (its last checkpoint was step 30)
//   attempt 2 (resumed at 30, T+1h):  config text at 30; scalars at 40..70; grids at 40, 60
//
// Scalar values: loss = attempt + step / 1000, lr = 1e-4 / attempt, so every point tells which
// attempt wrote it. Grids are real PNGs (stb), different per attempt and step; each one a reader
// should show is also saved as DIR/expected/samples-<step>.png.
//
// Usage: tensorboard_fixture DIR   (writes DIR/tensorboard/ and DIR/expected/)
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "trainer/tensorboard.h"

namespace {

using diffuse::trainer::TensorBoardOptions;
using diffuse::trainer::TensorBoardWriter;

std::string make_png(int attempt, int64_t step) {
  const int width = 24, height = 16;
  std::vector<unsigned char> pixels(width * height * 3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      unsigned char* p = &pixels[(y * width + x) * 3];
      p[0] = static_cast<unsigned char>(x * 10);
      p[1] = static_cast<unsigned char>(y * 15);
      p[2] = static_cast<unsigned char>(attempt * 100 + step);
    }
  }
  std::string png;
  auto append = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data), size);
  };
  if (stbi_write_png_to_func(append, &png, width, height, 3, pixels.data(), width * 3) == 0) {
    throw std::runtime_error("stb could not encode a PNG");
  }
  return png;
}

void attempt(const std::filesystem::path& root, int number, std::optional<int64_t> resumed_from,
             const std::vector<int64_t>& scalar_steps, const std::vector<int64_t>& grid_steps) {
  double clock = 1700000000.0 + 3600.0 * (number - 1);
  TensorBoardWriter writer(root / "tensorboard", {.resumed_from = resumed_from, .wall_clock = [&] { return clock += 1; }});
  // A fenced block: TensorBoard renders text as Markdown, which would run YAML lines together.
  writer.add_text("config", "```\nattempt: " + std::to_string(number) + "\nmodel:\n  dim: 64\n```\n",
                  resumed_from.value_or(0));
  for (int64_t step : scalar_steps) {
    writer.add_scalars({{"loss", number + step / 1000.0}, {"loss/q0", 0.5}, {"lr", 1e-4 / number}}, step);
    if (std::find(grid_steps.begin(), grid_steps.end(), step) != grid_steps.end()) {
      writer.add_image("samples", make_png(number, step), step);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: tensorboard_fixture DIR\n";
    return 2;
  }
  std::filesystem::path root(argv[1]);
  std::filesystem::create_directories(root / "expected");
  try {
    attempt(root, 1, std::nullopt, {10, 20, 30, 40, 50}, {20, 40});
    attempt(root, 2, 30, {40, 50, 60, 70}, {40, 60});
    // What survives the resume: attempt 1's grid at 20 (before its checkpoint), attempt 2's after.
    for (auto [number, step] : std::vector<std::pair<int, int64_t>>{{1, 20}, {2, 40}, {2, 60}}) {
      std::ofstream(root / "expected" / ("samples-" + std::to_string(step) + ".png"), std::ios::binary)
          << make_png(number, step);
    }
  } catch (const std::exception& error) {
    std::cerr << "tensorboard_fixture: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
