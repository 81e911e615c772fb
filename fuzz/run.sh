#!/usr/bin/env bash
# Runs one fuzz target for a bounded time: bash fuzz/run.sh TARGET SECONDS [extra libFuzzer flags]
# FORK=0 runs in-process (faster, but stops at the first crash); the default
# forks one child at a time and goes on past crashes, timeouts and OOMs.
# New inputs go to fuzz/corpus-work/TARGET (git-ignored); the seeds in
# fuzz/corpus/TARGET are read too. Crashes land in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")"
t="$1"; secs="$2"; shift 2
case "$t" in
    open_qcow2|open_vmdk|open_vhdx) max_len=262144 ;;
    open_vpc_vdi) max_len=65536 ;;
    qcow2_ops) max_len=70000 ;;
    vmdk_descriptor|pool_xml) max_len=16384 ;;
    *) max_len=4096 ;;
esac
fork="-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1"
[ "${FORK:-1}" = 0 ] && fork=""
mkdir -p "corpus-work/$t"
exec cargo +nightly fuzz run -O "$t" "corpus-work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -max_len="$max_len" -print_final_stats=1 $fork "$@"
