// Durable writes: replacing only regular files and only when asked, refusing device nodes,
// folders and FIFOs (also behind links), reporting every failed write, and leaving no temporary.
#include "util/durable_file.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "support.h"

namespace diffuse::util {
namespace {
namespace fs = std::filesystem;
using testing::error_of;
using testing::TempDir;
using testing::read_file;

// Names in `dir` other than the ones given: a leftover temporary would show up here.
std::vector<std::string> other_names(const fs::path& dir, const std::set<std::string>& expected) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (!expected.count(entry.path().filename().string())) names.push_back(entry.path().filename().string());
  }
  return names;
}

bool is_char_device(const fs::path& path) {
  struct stat info {};
  return ::lstat(path.c_str(), &info) == 0 && S_ISCHR(info.st_mode);
}

TEST(DurableFile, WritesANewFileAndReplacesOnlyWithOverwrite) {
  TempDir dir;
  const auto path = dir / "out.json";
  write_file(path, "first");
  EXPECT_EQ(read_file(path), "first");

  auto message = error_of([&] { write_file(path, "second"); });
  EXPECT_NE(message.find(path.string() + "' exists; pass --overwrite to replace it"), std::string::npos) << message;
  EXPECT_EQ(read_file(path), "first");

  write_file(path, "third", /*overwrite=*/true);
  EXPECT_EQ(read_file(path), "third");
  EXPECT_EQ(other_names(dir.path(), {"out.json"}), std::vector<std::string>{});
}

TEST(DurableFile, RefusesDeviceNodesWithoutTouchingThem) {
  // Only checks: the refusal comes before any temporary is created or anything renamed, so
  // /dev/null is never at risk (this test may run as root).
  ASSERT_TRUE(is_char_device("/dev/null"));
  auto message = error_of([] { check_destination("/dev/null", /*overwrite=*/true); });
  EXPECT_NE(message.find("refusing to replace '/dev/null': it is a character device, not a regular file"),
            std::string::npos)
      << message;
  message = error_of([] { AtomicFile file("/dev/null", /*overwrite=*/true); });
  EXPECT_NE(message.find("character device"), std::string::npos) << message;
  EXPECT_TRUE(is_char_device("/dev/null"));
  EXPECT_FALSE(fs::exists("/dev/null.tmp-" + std::to_string(::getpid())));

  TempDir dir;
  fs::create_symlink("/dev/null", dir / "link");
  message = error_of([&] { write_file(dir / "link", "x", /*overwrite=*/true); });
  EXPECT_NE(message.find("symbolic link to a character device ('/dev/null')"), std::string::npos) << message;
  EXPECT_TRUE(fs::is_symlink(dir / "link"));
  EXPECT_TRUE(is_char_device("/dev/null"));
}

TEST(DurableFile, RefusesFifosAndFolders) {
  TempDir dir;
  ASSERT_EQ(::mkfifo((dir / "pipe").c_str(), 0600), 0);
  auto message = error_of([&] { write_file(dir / "pipe", "x", /*overwrite=*/true); });
  EXPECT_NE(message.find("it is a FIFO (named pipe), not a regular file"), std::string::npos) << message;
  EXPECT_TRUE(fs::is_fifo(dir / "pipe"));

  fs::create_directory(dir / "folder");
  message = error_of([&] { write_file(dir / "folder", "x", /*overwrite=*/true); });
  EXPECT_NE(message.find("it is a directory"), std::string::npos) << message;
  EXPECT_TRUE(fs::is_directory(dir / "folder"));
  EXPECT_EQ(other_names(dir.path(), {"pipe", "folder"}), std::vector<std::string>{});
}

TEST(DurableFile, ReplacesALinkToARegularFileNotItsTarget) {
  TempDir dir;
  write_file(dir / "target", "kept");
  fs::create_symlink(dir / "target", dir / "link");
  write_file(dir / "link", "new", /*overwrite=*/true);
  EXPECT_FALSE(fs::is_symlink(dir / "link"));
  EXPECT_EQ(read_file(dir / "link"), "new");
  EXPECT_EQ(read_file(dir / "target"), "kept");
}

TEST(DurableFile, MissingFolderIsNamed) {
  TempDir dir;
  auto message = error_of([&] { write_file(dir / "no" / "such" / "x.png", "x"); });
  EXPECT_NE(message.find("folder '" + (dir / "no" / "such").string() + "' does not exist"), std::string::npos)
      << message;
}

TEST(DurableFile, WriteErrorsAreReported) {
  // /dev/full fails every write with ENOSPC: what a full disk does to the temporary file.
  int fd = ::open("/dev/full", O_WRONLY | O_CLOEXEC);
  if (fd < 0) GTEST_SKIP() << "no /dev/full on this system";
  std::string block(1 << 16, 'x');
  auto message = error_of([&] { write_all(fd, block.data(), block.size(), "grid.png"); });
  ::close(fd);
  EXPECT_NE(message.find("cannot write 'grid.png': No space left on device"), std::string::npos) << message;
}

// A 64 KiB tmpfs: a real full disk for the whole protocol. Needs the right to mount (root in a
// namespace that allows it); otherwise the test says why it skips.
class FullDisk : public ::testing::Test {
 protected:
  void SetUp() override {
    mount_point_ = dir_ / "small";
    fs::create_directory(mount_point_);
    if (::mount("tmpfs", mount_point_.c_str(), "tmpfs", 0, "size=64k") != 0) {
      GTEST_SKIP() << "cannot mount a 64 KiB tmpfs to fill (" << std::strerror(errno)
                   << "); the write-error path is covered by WriteErrorsAreReported with /dev/full";
    }
    mounted_ = true;
  }
  void TearDown() override {
    if (mounted_) ::umount2(mount_point_.c_str(), MNT_DETACH);
  }
  TempDir dir_;
  fs::path mount_point_;
  bool mounted_ = false;
};

TEST_F(FullDisk, FailsLoudlyKeepsTheOldFileAndLeavesNoTemporary) {
  const auto path = mount_point_ / "samples.h5";
  write_file(path, "old contents");
  std::string big(1 << 20, 'x');
  auto message = error_of([&] { write_file(path, big, /*overwrite=*/true); });
  EXPECT_NE(message.find("cannot write '" + path.string() + "': No space left on device"), std::string::npos)
      << message;
  EXPECT_EQ(read_file(path), "old contents");
  EXPECT_EQ(other_names(mount_point_, {"samples.h5"}), std::vector<std::string>{});
}

TEST(AtomicFile, WithoutCommitRemovesTheTemporary) {
  TempDir dir;
  fs::path temporary;
  {
    AtomicFile file(dir / "x.h5", /*overwrite=*/false);
    temporary = file.temporary();
    EXPECT_EQ(temporary, fs::path((dir / "x.h5").string() + ".tmp-" + std::to_string(::getpid())));
    file.write("abc", 3);
    EXPECT_TRUE(fs::exists(temporary));
    EXPECT_FALSE(fs::exists(dir / "x.h5"));
  }
  EXPECT_FALSE(fs::exists(temporary));
  EXPECT_FALSE(fs::exists(dir / "x.h5"));
}

TEST(AtomicFile, PublishesWhatAnotherWriterPutAtTheTemporaryPath) {
  TempDir dir;
  AtomicFile file(dir / "x.bin", /*overwrite=*/false);
  std::ofstream(file.temporary(), std::ios::binary | std::ios::trunc) << "written by a library";
  file.commit();
  EXPECT_TRUE(file.committed());
  EXPECT_EQ(read_file(dir / "x.bin"), "written by a library");
  EXPECT_EQ(other_names(dir.path(), {"x.bin"}), std::vector<std::string>{});
}

TEST(AtomicFile, DoesNotReplaceAFileThatAppearedWhileWriting) {
  TempDir dir;
  AtomicFile file(dir / "x.txt", /*overwrite=*/false);
  file.write("mine", 4);
  std::ofstream(dir / "x.txt") << "someone else's";
  auto message = error_of([&] { file.commit(); });
  EXPECT_NE(message.find("exists; pass --overwrite"), std::string::npos) << message;
  EXPECT_EQ(read_file(dir / "x.txt"), "someone else's");
}

TEST(StaleTemporaries, RemovesOnlyOldOnesOfDeadProcesses) {
  TempDir dir;
  // A PID that is certainly not running: a child that has exited and been reaped.
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);
  const std::string dead = std::to_string(child), alive = std::to_string(::getppid());
  const auto old_time = fs::file_time_type::clock::now() - std::chrono::hours(1);
  const std::vector<std::string> names{"out.h5.incomplete-" + dead, "out.h5.incomplete-" + alive,
                                       "out.h5.incomplete-x1", "other.h5.incomplete-" + dead,
                                       "fresh.h5.incomplete-" + dead};
  for (const std::string& name : names) {
    std::ofstream(dir / name) << "partial";
    if (name.rfind("fresh", 0) != 0) fs::last_write_time(dir / name, old_time);
  }
  auto removed = remove_stale_temporaries(dir / "out.h5", ".incomplete-");
  EXPECT_EQ(removed, std::vector<fs::path>{dir / ("out.h5.incomplete-" + dead)});
  EXPECT_FALSE(fs::exists(dir / ("out.h5.incomplete-" + dead)));
  EXPECT_TRUE(fs::exists(dir / ("out.h5.incomplete-" + alive)));
  EXPECT_TRUE(fs::exists(dir / "out.h5.incomplete-x1"));
  EXPECT_TRUE(fs::exists(dir / ("other.h5.incomplete-" + dead)));
  // Recently modified: perhaps a process on another host of a shared file system.
  EXPECT_TRUE(remove_stale_temporaries(dir / "fresh.h5", ".incomplete-").empty());
}

}  // namespace
}  // namespace diffuse::util
