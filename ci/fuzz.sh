#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 30 s each; FUZZ_SECONDS to change).
# With the nightly toolchain the targets run under AddressSanitizer; without it (a fresh CI
# machine has only stable) they run on stable with `--sanitizer none`: libFuzzer's coverage
# guidance and panic detection work the same, only ASan's memory checks are missing (the
# fuzzed decoders are safe Rust).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-30}"
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly); sanitizer=()
  echo "fuzz: nightly toolchain, AddressSanitizer"
else
  toolchain=(+stable); sanitizer=(--sanitizer none)
  echo "fuzz: no nightly toolchain here; stable with --sanitizer none (no ASan memory checks)"
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
for target in $(cargo "${toolchain[@]}" fuzz list); do
  echo "fuzz: $target for ${seconds}s"
  # The corpus in fuzz/corpus/$target is kept in the repository and grows as CI finds inputs.
  log="$(mktemp)"
  if ! cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" "$target" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $target FAILED: the crashing input is in fuzz/artifacts/$target"
    exit 1
  fi
  grep -E "^Done" "$log"
  rm -f "$log"
done
