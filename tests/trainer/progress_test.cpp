// Progress reporting for long commands: the live terminal line, the plain lines of batch logs,
// their throttling, the ETA arithmetic, and silence on ranks that are not rank 0. The clock and
// both outputs are injected, so every expected line is exact.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "trainer/progress.h"

namespace diffuse::trainer {
namespace {

struct Harness {
  double clock = 1000.0;
  std::ostringstream terminal;
  std::vector<std::string> lines;

  ProgressOptions options(bool live, int64_t total = 64) {
    return {.label = "sampling",
            .total = total,
            .unit = "images",
            .live = live,
            .interval_s = 30.0,
            .terminal = &terminal,
            .log_line = [this](const std::string& line) { lines.push_back(line); },
            .clock = [this] { return clock; }};
  }
};

TEST(Progress, PlainLinesComeAtMostOncePerIntervalThenASummary) {
  Harness h;
  Progress progress(h.options(/*live=*/false));
  h.clock += 10;
  progress.advance(8);
  EXPECT_TRUE(h.lines.empty());  // 10 s < 30 s
  h.clock += 22;                 // 32 s in, 16 done: 0.5 images/s, 48 to go
  progress.advance(8);
  ASSERT_EQ(h.lines.size(), 1u);
  EXPECT_EQ(h.lines[0], "sampling: 16/64 images (25%), 0.50 images/s, ETA 0:01:36");
  h.clock += 20;  // 20 s after the last line: none
  progress.advance(16);
  EXPECT_EQ(h.lines.size(), 1u);
  h.clock += 10;
  progress.advance(8);
  ASSERT_EQ(h.lines.size(), 2u);
  EXPECT_EQ(h.lines[1], "sampling: 40/64 images (62%), 0.65 images/s, ETA 0:00:37");
  h.clock += 40;  // the last units: no progress line, the summary says it
  progress.advance(24);
  EXPECT_EQ(h.lines.size(), 2u);
  progress.finish();
  progress.finish();  // once
  ASSERT_EQ(h.lines.size(), 3u);
  EXPECT_EQ(h.lines[2], "sampling: 64 images in 0:01:42 (0.63 images/s)");
  EXPECT_EQ(h.terminal.str(), "");  // nothing drawn on a non-terminal
}

TEST(Progress, LiveLineRedrawsInPlaceAtMostFiveTimesASecond) {
  Harness h;
  Progress progress(h.options(/*live=*/true, /*total=*/1000));
  h.clock += 2;
  progress.advance(250);  // first advance draws at once
  EXPECT_EQ(h.terminal.str(), "\rsampling: 250/1000 images (25%), 125 images/s, ETA 0:00:06");
  h.clock += 0.0625;
  progress.advance(1);  // 62.5 ms later: throttled
  h.clock += 0.0625;
  progress.advance(1);
  EXPECT_EQ(h.terminal.str(), "\rsampling: 250/1000 images (25%), 125 images/s, ETA 0:00:06");
  h.clock += 0.375;  // 2.5 s in
  progress.advance(8);
  EXPECT_EQ(h.terminal.str(),
            "\rsampling: 250/1000 images (25%), 125 images/s, ETA 0:00:06"
            "\rsampling: 260/1000 images (26%), 104 images/s, ETA 0:00:07");
  EXPECT_TRUE(h.lines.empty());  // live mode logs only the summary
  h.terminal.str("");
  h.clock += 7.5;  // 10 s in
  progress.advance(740);  // complete: drawn despite the throttle
  EXPECT_EQ(h.terminal.str(), "\rsampling: 1000/1000 images (100%), 100 images/s, ETA 0:00:00");
  h.terminal.str("");
  progress.finish();
  const std::string blank(std::string("sampling: 1000/1000 images (100%), 100 images/s, ETA 0:00:00").size(), ' ');
  EXPECT_EQ(h.terminal.str(), "\r" + blank + "\r");
  ASSERT_EQ(h.lines.size(), 1u);
  EXPECT_EQ(h.lines[0], "sampling: 1000 images in 0:00:10 (100 images/s)");
}

TEST(Progress, AnAbandonedLiveLineIsEndedSoLaterOutputStartsFresh) {
  Harness h;
  {
    Progress progress(h.options(/*live=*/true));
    progress.advance(1);
  }  // e.g. an exception unwinding
  EXPECT_EQ(h.terminal.str().back(), '\n');
  EXPECT_TRUE(h.lines.empty());  // no summary for work that did not finish
}

TEST(Progress, DisabledShowsNothing) {
  for (bool live : {false, true}) {
    Harness h;
    auto options = h.options(live);
    options.enabled = false;
    {
      Progress progress(options);
      h.clock += 100;
      progress.advance(64);
      progress.finish();
    }
    EXPECT_EQ(h.terminal.str(), "") << live;
    EXPECT_TRUE(h.lines.empty()) << live;
  }
}

TEST(Progress, UnknownTotalShowsCountAndRateOnly) {
  Harness h;
  Progress progress(h.options(/*live=*/false, /*total=*/0));
  h.clock += 40;
  progress.advance(100);
  ASSERT_EQ(h.lines.size(), 1u);
  EXPECT_EQ(h.lines[0], "sampling: 100 images, 2.50 images/s");
}

TEST(Progress, EtaIsUnknownUntilSomethingIsDone) {
  Harness h;
  Progress progress(h.options(/*live=*/false));
  h.clock += 31;
  progress.advance(0);
  ASSERT_EQ(h.lines.size(), 1u);
  EXPECT_EQ(h.lines[0], "sampling: 0/64 images (0%), 0.00 images/s, ETA ?");
}

TEST(Progress, DurationsAsHoursMinutesSeconds) {
  EXPECT_EQ(format_hms(0), "0:00:00");
  EXPECT_EQ(format_hms(3725.4), "1:02:05");
  EXPECT_EQ(format_hms(3725.6), "1:02:06");
  EXPECT_EQ(format_hms(100 * 3600), "100:00:00");
  EXPECT_EQ(format_hms(-1), "?");
  EXPECT_EQ(format_hms(NAN), "?");
}

TEST(BytesProgress, ShowsMebibytesOnceTheTotalIsKnown) {
  Harness h;
  auto options = h.options(/*live=*/false);
  options.label = "loading checkpoint";
  BytesProgress reading(options);
  h.clock += 40;
  reading.report(3 << 20, 10 << 20);  // the first report creates the line with its total
  reading.report(10 << 20, 10 << 20);
  reading.finish();
  ASSERT_FALSE(h.lines.empty());
  EXPECT_EQ(h.lines.back().rfind("loading checkpoint: 10 MiB in", 0), 0u) << h.lines.back();
}

}  // namespace
}  // namespace diffuse::trainer
