// data/impl/pixels.h: 8-bit image machinery without LibTorch: decode/encode (stb), channel
// conversion, centre-crop + resize, and a small deterministic PRNG. image_io.h wraps it in tensors.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace diffuse::data::impl {

/// A view of interleaved 8-bit pixels, row-major [height, width, channels].
struct ImageView {
  const uint8_t* data = nullptr;
  int64_t height = 0, width = 0, channels = 0;
};

/// An owned image, row-major [height, width, channels].
struct Image {
  std::vector<uint8_t> pixels;
  int64_t height = 0, width = 0, channels = 0;
  ImageView view() const { return {pixels.data(), height, width, channels}; }
};

/// Width, height and channels from a PNG/JPEG/BMP header without decoding the pixels.
struct ImageHeader {
  int64_t height = 0, width = 0, channels = 0;
};
/// Reads the header; returns false and sets `error` when the file is not a readable image.
bool read_image_header(const std::filesystem::path& path, ImageHeader& header, std::string& error);

/// Decodes a PNG, JPEG or BMP file with its own channel count (1, 2, 3 or 4; 16-bit PNGs are
/// reduced to 8 bits). Throws naming the file and the decoder's reason.
Image decode_image_file(const std::filesystem::path& path);

/// Writes PNG, JPEG or BMP, chosen by the file extension (.png, .jpg/.jpeg, .bmp), through
/// util::AtomicFile: every write checked, an existing file replaced only with `overwrite`, never a
/// device or folder. Creates the parent folder when missing. Throws naming the file and the
/// reason (e.g. "No space left on device").
void encode_image_file(const std::filesystem::path& path, const ImageView& image, int jpeg_quality = 95,
                       bool overwrite = false);

/// Converts 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels to 1 or 3. Alpha is dropped
/// (as PIL's convert); grey is replicated; RGB to grey is ITU-R 601 luma in PIL's integer form.
Image convert_channels(const ImageView& image, int64_t channels);

/// Centre-crops to a square (the shorter side) and resizes to size x size: area averaging when
/// shrinking (each output pixel is the mean of the source area it covers), bilinear with
/// half-pixel centres when enlarging.
Image square_resize(const ImageView& image, int64_t size);

/// The preparation pipeline for one image: channel conversion and, when size > 0, centre-crop
/// and resize, in the cheaper order. Writes size x size x channels bytes to `out` (or the source
/// size when size == 0).
void fit_image(const ImageView& image, int64_t size, int64_t channels, uint8_t* out);

/// splitmix64's output function: a strong 64-bit mix (Steele, Lea, Flood 2014).
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
/// Hashes a key of several words into one, order-sensitive.
inline uint64_t hash_words(uint64_t a, uint64_t b) { return mix64(a ^ mix64(b + 0x632be59bd9b4e019ULL)); }
inline uint64_t hash_words(uint64_t a, uint64_t b, uint64_t c) { return hash_words(hash_words(a, b), c); }

/// A splitmix64 stream: plain, portable, and identical on every machine and thread.
class SplitMix {
 public:
  explicit SplitMix(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    uint64_t x = state_;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }
  /// Uniform in [0, bound), unbiased (Lemire's multiply-shift with rejection).
  uint64_t below(uint64_t bound) {
    unsigned __int128 product = static_cast<unsigned __int128>(next()) * bound;
    uint64_t low = static_cast<uint64_t>(product);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        product = static_cast<unsigned __int128>(next()) * bound;
        low = static_cast<uint64_t>(product);
      }
    }
    return static_cast<uint64_t>(product >> 64);
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

}  // namespace diffuse::data::impl
