// trainer/doctor.h: the environment report behind `diffuse doctor` and every run's env.txt: a per-rank report of everything a cluster user needs to
// debug a job's environment, and a verdict on whether a run can start.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "dist/context.h"

namespace diffuse::trainer {

enum class DeviceRequest { kAuto, kCpu, kCuda };

/// Parses "auto", "cpu" or "cuda"; throws naming the value otherwise.
DeviceRequest parse_device_request(const std::string& text);

struct DoctorReport {
  std::vector<std::pair<std::string, std::string>> facts;  ///< in print order
  std::vector<std::string> problems;                       ///< empty when the rank is usable
  std::string to_text() const;
};

/// Collects this rank's report (does not communicate).
DoctorReport collect_doctor_report(const dist::Context& ctx, DeviceRequest device);


}  // namespace diffuse::trainer
