// main() for test binaries that run under mpirun: brings up MPI once, lets only rank 0 print
// (every rank still runs every test), and makes the exit code fail on every rank if any rank
// failed. A failed MPI start fails the binary; it never skips.
#include <gtest/gtest.h>

#include <iostream>

#include "mpi_support.h"

namespace diffuse::testing {
namespace {
dist::Context* g_context = nullptr;
}
const dist::Context& world() {
  if (g_context == nullptr) throw std::logic_error("world() used before mpi_main set it up");
  return *g_context;
}
}  // namespace diffuse::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto context = diffuse::dist::Context::init(&argc, &argv);
  diffuse::testing::g_context = &context;
  if (!context.is_root()) {
    // Failures on other ranks still print (gtest's default printer writes them), but the
    // per-test chatter comes from rank 0 only.
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    struct FailurePrinter : ::testing::EmptyTestEventListener {
      int rank;
      explicit FailurePrinter(int r) : rank(r) {}
      void OnTestPartResult(const ::testing::TestPartResult& result) override {
        if (result.failed()) {
          std::cerr << "[rank " << rank << "] " << (result.file_name() ? result.file_name() : "?") << ":"
                    << result.line_number() << ": " << result.summary() << std::endl;
        }
      }
    };
    listeners.Append(new FailurePrinter(context.rank()));
  }
  int result = RUN_ALL_TESTS();
  int worst = static_cast<int>(context.max_over_ranks(result));
  diffuse::testing::g_context = nullptr;
  return worst;
}
