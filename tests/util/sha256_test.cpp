// SHA-256 against the FIPS 180-2 test vectors, for bytes, pieces and files.
#include "util/sha256.h"

#include <fstream>

#include "support.h"

namespace diffuse::util {
namespace {

TEST(Sha256, MatchesStandardVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 pieces;
  pieces.update("abcdbcdecdefdefgefghfghighij");
  pieces.update("hijkijkljklmklmnlmnomnopnopq");
  EXPECT_EQ(pieces.hex_digest(), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256, OfAFileEqualsOfItsBytes) {
  testing::TempDir dir;
  std::string bytes(5 << 20, 'x');  // more than one 4 MiB read
  bytes[12345] = 'y';
  std::ofstream(dir / "f", std::ios::binary) << bytes;
  EXPECT_EQ(sha256_file(dir / "f"), sha256_hex(bytes));
  EXPECT_NE(testing::error_of([&] { sha256_file(dir / "missing"); }).find("missing"), std::string::npos);
}

}  // namespace
}  // namespace diffuse::util
