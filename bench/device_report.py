#!/usr/bin/env python3
"""bench/device_report.py: judges and summarises what launch/device-check.sh run leaves in its work
folder (stdlib only: it runs under the image's python there and the torch venv's here).

    device_report.py tests WORK --ranks 1|2 --rehearse 0|1   # judge the gtest JSON reports of one part
    device_report.py summary WORK --rehearse 0|1             # WORK/summary.json and the table (stdout)

On the device every _CUDA test must run and pass; under 2 ranks on one GPU only the NCCL tests may
skip (NCCL needs a GPU per rank). In the CPU rehearsal _CUDA tests skip (no GPU), and none may fail.
Exit status: 0 when the part (tests) or every part (summary) is ok.
"""
import argparse
import glob
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gtest_cases(paths):
    """(binary/file, suite.test, outcome, message) for every test case in gtest JSON reports."""
    cases = []
    for path in sorted(paths):
        report = load(path)
        if report is None:
            cases.append((os.path.basename(path), "(report)", "failed", "unreadable JSON report"))
            continue
        for suite in report.get("testsuites", []):
            for test in suite.get("testsuite", []):
                name = f"{suite['name']}.{test['name']}"
                failures = test.get("failures", [])
                if failures:
                    outcome = "failed"
                    message = failures[0].get("failure", "").splitlines()[0:3]
                    message = " / ".join(message)
                elif test.get("result") == "SKIPPED":
                    outcome, message = "skipped", ""
                else:
                    outcome, message = "passed", ""
                cases.append((os.path.basename(path), name, outcome, message))
    return cases


def judge_tests(work, ranks, rehearse):
    pattern = "tests-*.json" if ranks == 1 else "np2-*.json"
    paths = glob.glob(os.path.join(work, "json", pattern))
    cases = gtest_cases(paths)
    problems = []
    if not cases:
        problems.append(f"no _CUDA test reports ({pattern}): the binaries did not run")
    for file, name, outcome, message in cases:
        if outcome == "failed":
            problems.append(f"{name} failed ({file}): {message}")
        elif outcome == "skipped" and not rehearse:
            if ranks == 2 and "Nccl" in name:
                continue  # NCCL refuses two ranks on one GPU: expected, and said in the table
            problems.append(f"{name} skipped on the GPU machine ({file})")
    count = {k: sum(1 for c in cases if c[2] == k) for k in ("passed", "skipped", "failed")}
    result = {"ranks": ranks, "counts": count, "problems": problems,
              "cases": [{"file": f, "test": n, "outcome": o, "message": m} for f, n, o, m in cases]}
    with open(os.path.join(work, "json", f"tests-judged-np{ranks}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{ranks} rank(s): {count['passed']} passed, {count['skipped']} skipped, {count['failed']} failed"
          + (" (rehearsal: no GPU, _CUDA tests skip)" if rehearse else ""))
    for p in problems:
        print("  problem:", p)
    return not problems


def gib(value):
    return f"{value / 2**30:.1f} GiB" if isinstance(value, (int, float)) else "-"


def summarise(work, rehearse):
    parts = []
    with open(os.path.join(work, "parts.tsv")) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            parts.append({"name": fields[0], "status": fields[1], "seconds": int(fields[2] or 0),
                          "note": fields[3] if len(fields) > 3 else ""})
    j = lambda name: load(os.path.join(work, "json", name))
    tests = {n: j(f"tests-judged-np{n}.json") for n in (1, 2)}
    for p in parts:
        judged = tests.get({"cuda_tests": 1, "dist_np2": 2}.get(p["name"]))
        if judged:
            c = judged["counts"]
            p["note"] = f"{c['passed']} passed, {c['skipped']} skipped, {c['failed']} failed"
            if p["name"] == "dist_np2":
                p["note"] += "; NCCL needs a GPU per rank: its tests skip, the reducer runs on MPI"
    doctor = []
    try:
        with open(os.path.join(work, "json", "doctor.txt")) as f:
            doctor = [line.rstrip() for line in f if line.strip()]
    except OSError:
        pass
    bench = j("step_bench.json")
    eager, compiled = j("reference-eager.json"), j("reference-compile.json")
    batches = {}
    for path in glob.glob(os.path.join(work, "json", "batch-*.json")):
        b = load(path)
        if b and "batch_per_rank" in b:
            batches[int(b["batch_per_rank"])] = {"images_per_second": b["images_per_second"],
                                                 "cuda_peak_allocated_bytes": b.get("cuda_peak_allocated_bytes")}
    search_end = j("batch-oom.json") or {}
    ratio = lambda ref: (bench["images_per_second"] / ref["images_per_second"]
                         if bench and ref and ref.get("images_per_second") else None)
    export = j("export-check.json")
    summary = {
        "mode": "cpu-rehearsal" if rehearse else "device",
        "ok": all(p["status"] == "ok" for p in parts),
        "parts": parts,
        "doctor": doctor,
        "tests": tests,
        "export_check": export,
        "step_bench": bench,
        "reference": {"eager": eager, "compile": compiled},
        "diffuse_over_reference": {"eager": ratio(eager), "compile": ratio(compiled)},
        "batch_search": {"fits": {str(k): batches[k] for k in sorted(batches)},
                         "largest_that_fits": max(batches) if batches else None, **search_end},
    }
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    gpu = next((line.split(":", 1)[-1].strip() for line in doctor if line.strip().startswith("GPU 0")), "no GPU")
    print(f"diffuse device check: {'CPU rehearsal (stand-ins: tiny configs on CPU)' if rehearse else 'device'}"
          f", {gpu}")
    print(f"{'part':<18}{'status':<26}{'s':>5}  note")
    for p in parts:
        print(f"{p['name']:<18}{p['status']:<26}{p['seconds']:>5}  {p['note']}")
    if bench:
        ceiling = bench.get("matmul_bf16_flops") if bench.get("precision") != "fp32" else bench.get("matmul_fp32_flops")
        phases = bench.get("step_seconds", {})
        print(f"\n{bench['config']} on {bench['device']}, {bench['precision']}, batch {int(bench['batch_per_rank'])}:")
        print(f"  diffuse            {bench['images_per_second']:9.1f} images/s  MFU "
              + (f"{100 * bench['mfu']:.1f}% of {ceiling / 1e12:.1f} TFLOP/s measured {bench['mfu_ceiling']}"
                 if isinstance(bench.get("mfu"), (int, float)) and ceiling else "-")
              + f"  peak {gib(bench.get('cuda_peak_allocated_bytes'))}")
        print("  phases (ms)       " + "  ".join(f"{k} {1e3 * v:.1f}" for k, v in phases.items()
                                                  if isinstance(v, (int, float))))
    for name, ref in (("eager", eager), ("compile", compiled)):
        if ref:
            r = summary["diffuse_over_reference"][name]
            print(f"  reference {name:<8}{ref['images_per_second']:9.1f} images/s  diffuse/reference "
                  + (f"{r:.2f}x" if r else "-"))
        else:
            print(f"  reference {name:<8}        - (no result: see logs/reference_{name}.log)")
    if batches or search_end:
        end = (f"out of memory at {search_end['out_of_memory_at']}" if "out_of_memory_at" in search_end
               else f"search stopped at {search_end.get('search_ended_at', '?')}")
        print(f"  largest batch that fits: {summary['batch_search']['largest_that_fits']} ({end})")
    print("result:", "ok" if summary["ok"] else "FAILED: " + ", ".join(p["name"] for p in parts if p["status"] != "ok"))
    return summary["ok"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["tests", "summary"])
    p.add_argument("work")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--rehearse", type=int, default=0)
    a = p.parse_args()
    ok = judge_tests(a.work, a.ranks, a.rehearse == 1) if a.command == "tests" else summarise(a.work, a.rehearse == 1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
