// 8-bit image machinery: stb decoders/encoders (compiled here, only for PNG, JPEG and BMP),
// channel conversion and the separable crop-and-resize of `diffuse prep`. Plain C++, no LibTorch.
#include "data/impl/pixels.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>

// stb is third-party C: compile it without our warning flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>
#pragma GCC diagnostic pop

#include "util/durable_file.h"

namespace diffuse::data::impl {
namespace fs = std::filesystem;

bool read_image_header(const fs::path& path, ImageHeader& header, std::string& error) {
  int width = 0, height = 0, channels = 0;
  if (stbi_info(path.c_str(), &width, &height, &channels) == 0) {
    error = stbi_failure_reason() ? stbi_failure_reason() : "unreadable";
    if (error == "can't fopen") error = std::string("cannot open: ") + std::strerror(errno);
    return false;
  }
  header = {height, width, channels};
  return true;
}

Image decode_image_file(const fs::path& path) {
  int width = 0, height = 0, channels = 0;
  std::unique_ptr<stbi_uc, void (*)(void*)> pixels(stbi_load(path.c_str(), &width, &height, &channels, 0),
                                                   stbi_image_free);
  if (!pixels) {
    std::string reason = stbi_failure_reason() ? stbi_failure_reason() : "unknown error";
    throw std::runtime_error("cannot decode image '" + path.string() + "': " + reason);
  }
  Image image;
  image.height = height;
  image.width = width;
  image.channels = channels;
  image.pixels.assign(pixels.get(), pixels.get() + static_cast<size_t>(width) * height * channels);
  return image;
}

namespace {

// stb hands the encoded bytes to a callback that cannot report failure: the first error is kept
// here and rethrown once stb returns (throwing through stb's C code would leak its buffers).
struct EncodeTarget {
  util::AtomicFile* file = nullptr;
  std::exception_ptr error;
};

extern "C" void write_encoded(void* context, void* data, int size) {
  auto* target = static_cast<EncodeTarget*>(context);
  if (target->error || size <= 0) return;
  try {
    target->file->write(data, static_cast<size_t>(size));
  } catch (...) {
    target->error = std::current_exception();
  }
}

}  // namespace

void encode_image_file(const fs::path& path, const ImageView& image, int jpeg_quality, bool overwrite) {
  std::string extension = path.extension().string();
  std::transform(extension.begin(), extension.end(), extension.begin(), ::tolower);
  if (extension != ".png" && extension != ".jpg" && extension != ".jpeg" && extension != ".bmp") {
    throw std::invalid_argument("cannot write image '" + path.string() + "': unknown extension (use .png, .jpg or .bmp)");
  }
  const int w = static_cast<int>(image.width), h = static_cast<int>(image.height);
  const int c = static_cast<int>(image.channels);
  if (!path.parent_path().empty()) {
    std::error_code error;
    fs::create_directories(path.parent_path(), error);
    if (error) throw std::runtime_error("cannot create the folder of '" + path.string() + "': " + error.message());
  }
  util::AtomicFile file(path, overwrite);
  EncodeTarget target{&file, nullptr};
  int ok = 0;
  if (extension == ".png") {
    ok = stbi_write_png_to_func(write_encoded, &target, w, h, c, image.data, w * c);
  } else if (extension == ".bmp") {
    ok = stbi_write_bmp_to_func(write_encoded, &target, w, h, c, image.data);
  } else {
    ok = stbi_write_jpg_to_func(write_encoded, &target, w, h, c, image.data, jpeg_quality);
  }
  if (target.error) std::rethrow_exception(target.error);
  if (!ok) throw std::runtime_error("cannot write image '" + path.string() + "': the encoder failed");
  file.commit();
}

Image convert_channels(const ImageView& image, int64_t channels) {
  if (channels != 1 && channels != 3) {
    throw std::invalid_argument("channels must be 1 or 3, got " + std::to_string(channels));
  }
  if (image.channels < 1 || image.channels > 4) {
    throw std::invalid_argument("images must have 1 to 4 channels, got " + std::to_string(image.channels));
  }
  Image out;
  out.height = image.height;
  out.width = image.width;
  out.channels = channels;
  const int64_t n = image.height * image.width, c = image.channels;
  out.pixels.resize(static_cast<size_t>(n * channels));
  const bool colour = c >= 3;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* p = image.data + i * c;
    uint8_t* q = out.pixels.data() + i * channels;
    if (channels == 3) {
      q[0] = p[0];
      q[1] = colour ? p[1] : p[0];
      q[2] = colour ? p[2] : p[0];
    } else {
      q[0] = colour ? static_cast<uint8_t>((p[0] * 19595u + p[1] * 38470u + p[2] * 7471u + 0x8000u) >> 16) : p[0];
    }
  }
  return out;
}

namespace {

struct Tap {
  int64_t index;
  float weight;
};

// Weights mapping `length` source pixels starting at `offset` onto `out` pixels.
std::vector<std::vector<Tap>> axis_taps(int64_t offset, int64_t length, int64_t out) {
  std::vector<std::vector<Tap>> taps(out);
  if (out == length) {
    for (int64_t o = 0; o < out; ++o) taps[o] = {{offset + o, 1.f}};
  } else if (out < length) {
    // Area: output pixel o covers source interval [o * scale, (o + 1) * scale).
    const double scale = static_cast<double>(length) / out;
    for (int64_t o = 0; o < out; ++o) {
      const double a = o * scale, b = (o + 1) * scale;
      for (auto i = static_cast<int64_t>(std::floor(a)); i < length && i < b; ++i) {
        const double overlap = std::min(b, i + 1.0) - std::max(a, static_cast<double>(i));
        if (overlap > 1e-9) taps[o].push_back({offset + i, static_cast<float>(overlap / scale)});
      }
    }
  } else {
    // Bilinear with half-pixel centres (align_corners = false), clamped at the borders.
    const double scale = static_cast<double>(length) / out;
    for (int64_t o = 0; o < out; ++o) {
      const double s = std::clamp((o + 0.5) * scale - 0.5, 0.0, static_cast<double>(length - 1));
      const auto i0 = static_cast<int64_t>(std::floor(s));
      const double t = s - i0;
      taps[o].push_back({offset + i0, static_cast<float>(1.0 - t)});
      if (t > 0) taps[o].push_back({offset + std::min(i0 + 1, length - 1), static_cast<float>(t)});
    }
  }
  return taps;
}

}  // namespace

Image square_resize(const ImageView& image, int64_t size) {
  if (size <= 0) throw std::invalid_argument("resize: size must be positive, got " + std::to_string(size));
  const int64_t side = std::min(image.height, image.width), c = image.channels;
  const auto rows = axis_taps((image.height - side) / 2, side, size);
  const auto cols = axis_taps((image.width - side) / 2, side, size);
  // Horizontal pass over the source rows the vertical pass needs, then the vertical pass.
  std::vector<float> horizontal(static_cast<size_t>(image.height * size * c), 0.f);
  std::vector<char> needed(image.height, 0);
  for (const auto& taps : rows) {
    for (const Tap& tap : taps) needed[tap.index] = 1;
  }
  for (int64_t y = 0; y < image.height; ++y) {
    if (!needed[y]) continue;
    const uint8_t* src = image.data + y * image.width * c;
    float* dst = horizontal.data() + y * size * c;
    for (int64_t x = 0; x < size; ++x) {
      for (const Tap& tap : cols[x]) {
        for (int64_t k = 0; k < c; ++k) dst[x * c + k] += tap.weight * src[tap.index * c + k];
      }
    }
  }
  Image out;
  out.height = out.width = size;
  out.channels = c;
  out.pixels.resize(static_cast<size_t>(size * size * c));
  std::vector<float> row(static_cast<size_t>(size * c));
  for (int64_t y = 0; y < size; ++y) {
    std::fill(row.begin(), row.end(), 0.f);
    for (const Tap& tap : rows[y]) {
      const float* src = horizontal.data() + tap.index * size * c;
      for (int64_t i = 0; i < size * c; ++i) row[i] += tap.weight * src[i];
    }
    uint8_t* dst = out.pixels.data() + y * size * c;
    for (int64_t i = 0; i < size * c; ++i) {
      dst[i] = static_cast<uint8_t>(std::clamp(std::floor(row[i] + 0.5f), 0.f, 255.f));
    }
  }
  return out;
}

void fit_image(const ImageView& image, int64_t size, int64_t channels, uint8_t* out) {
  // Convert first when it shrinks the data (colour -> grey, or alpha to drop); replicate grey
  // to RGB only after resizing.
  ImageView current = image;
  Image converted, resized;
  const bool colour_source = image.channels >= 3;
  if (image.channels == 2 || image.channels == 4 || (channels == 1 && colour_source)) {
    converted = convert_channels(current, channels == 1 ? 1 : (colour_source ? 3 : 1));
    current = converted.view();
  }
  if (size > 0 && !(current.height == size && current.width == size)) {
    resized = square_resize(current, size);
    current = resized.view();
  }
  if (current.channels != channels) {
    converted = convert_channels(current, channels);
    current = converted.view();
  }
  std::memcpy(out, current.data, static_cast<size_t>(current.height * current.width * current.channels));
}

}  // namespace diffuse::data::impl
