#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 30 s each; FUZZ_SECONDS to change).
# Needs the nightly toolchain (sanitizers); without it this says so and exits 0 with a clear
# SKIPPED line, since the stable build and tests do not depend on it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-30}"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "SKIPPED fuzzing: no nightly toolchain on this machine (cargo fuzz needs -Zsanitizer)"
  exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
for target in $(cargo +nightly fuzz list); do
  echo "fuzz: $target for ${seconds}s"
  # The corpus in fuzz/corpus/$target is kept in the repository and grows as CI finds inputs.
  log="$(mktemp)"
  if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $target FAILED: the crashing input is in fuzz/artifacts/$target"
    exit 1
  fi
  grep -E "^Done" "$log"
  rm -f "$log"
done
