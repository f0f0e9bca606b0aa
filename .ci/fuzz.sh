#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a short fixed time from its
# committed seeds (fuzz/seeds/<target>) plus what earlier runs found
# (fuzz/corpus/<target>, not committed), so a regression in a decoder of
# untrusted input shows in CI. Fails on any crash, leak or timeout; prints
# the executions per target. A longer campaign: FUZZ_SECONDS=600.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
build_log=$(mktemp)
if ! cargo +nightly fuzz build >"$build_log" 2>&1; then
    echo "fuzz targets: the build failed"
    tail -n 60 "$build_log"
    exit 1
fi
tail -n 1 "$build_log"
rm -f "$build_log"

failed=0
passed=0
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    log=$(mktemp)
    if cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        echo "fuzz $target: ${runs:-?} executions in ${secs}s, no crash"
        passed=$((passed + 1))
    else
        echo "fuzz $target: FAILED (artifacts in fuzz/artifacts/$target)"
        tail -n 40 "$log"
        failed=$((failed + 1))
    fi
    rm -f "$log"
done
echo "fuzz targets: $passed passed, $failed failed"
((failed == 0))
