#!/usr/bin/env bash
# Coverage-guided fuzzing of the wire decoders on the stable toolchain (no nightly needed):
# libFuzzer from libfuzzer-sys, with LLVM's sanitizer-coverage passes enabled by -C flags.
# Usage: fuzz/run.sh [seconds]   (default 60). Crashes land in fuzz/artifacts/.
# With nightly and cargo-fuzz installed, `cargo fuzz run decode` works as well.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
target=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --target "$target" --target-dir target/cov
mkdir -p corpus/decode artifacts
cp -n ../protocol/tests/golden/*.bin corpus/decode/ 2>/dev/null || true
"./target/cov/$target/release/decode" corpus/decode -artifact_prefix=artifacts/ \
  -max_total_time="$secs" -rss_limit_mb=2048
