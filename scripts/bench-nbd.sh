#!/usr/bin/env bash
# NBD server benchmark: `vdisk serve` against `qemu-nbd` serving the same
# qcow2, one common client (`qemu-img bench -f raw` over nbd+unix://, and
# nbdcopy), in the same run. Prints one line per workload: elapsed seconds
# and server CPU seconds for each server, and the speed ratio.
#
#   scripts/bench-nbd.sh [path/to/vdisk]      (default: target/release/vdisk)
set -euo pipefail
VDISK=${1:-${CARGO_TARGET_DIR:-target}/release/vdisk}
dir=$(mktemp -d)
trap 'kill $(cat "$dir"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$dir"' EXIT

img=$dir/bench.qcow2
qemu-img create -q -f qcow2 "$img" 256M
qemu-io -f qcow2 -c 'write -P 0x5a 0 256M' "$img" >/dev/null
sparse=$dir/sparse.qcow2
qemu-img create -q -f qcow2 "$sparse" 1G
for o in 0 100M 300M 700M 1000M; do qemu-io -f qcow2 -c "write -P 0x33 $o 8M" "$sparse" >/dev/null; done

# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# start NAME IMAGE: serves IMAGE on $dir/NAME.sock, pid in $dir/NAME.pid.
start() {
    local name=$1 image=$2 sock=$dir/$1.sock
    rm -f "$sock"
    if [ "$name" = vdisk ]; then
        "$VDISK" serve -t -e 16 -f qcow2 -k "$sock" "$image" & echo $! > "$dir/$name.pid"
    else
        qemu-nbd -t -e 16 -f qcow2 -k "$sock" "$image" & echo $! > "$dir/$name.pid"
    fi
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
}
stop() { kill "$(cat "$dir/$1.pid")"; wait "$(cat "$dir/$1.pid")" 2>/dev/null || true; rm -f "$dir/$1.pid"; }

# run NAME IMAGE CMD...: runs CMD with @URI@ replaced; prints "secs cpu".
run() {
    local name=$1 image=$2; shift 2
    start "$name" "$image"
    local pid; pid=$(cat "$dir/$name.pid")
    local uri="nbd+unix:///?socket=$dir/$name.sock"
    local args=("${@//@URI@/$uri}")
    args=("${args[@]//@OUT@/$dir/out.raw}")
    local c0; c0=$(cpu "$pid")
    local t0; t0=$(date +%s.%N)
    "${args[@]}" >/dev/null
    local t1; t1=$(date +%s.%N)
    local c1; c1=$(cpu "$pid")
    stop "$name"
    rm -f "$dir/out.raw"
    awk -v a="$t0" -v b="$t1" -v c="$c0" -v d="$c1" 'BEGIN { printf "%.3f %.2f", b - a, d - c }'
}

printf '%-34s %10s %8s %10s %8s %8s\n' workload vdisk-s cpu-s qemu-nbd-s cpu-s speed
bench() {
    local label=$1 image=$2; shift 2
    read -r vs vc <<<"$(run vdisk "$image" "$@")"
    read -r qs qc <<<"$(run qemu "$image" "$@")"
    printf '%-34s %10s %8s %10s %8s %7.2fx\n' "$label" "$vs" "$vc" "$qs" "$qc" "$(awk -v v="$vs" -v q="$qs" 'BEGIN { print q / v }')"
}
bench "4k reads, depth 1"   "$img" qemu-img bench -f raw -c 20000 -d 1 -s 4k -S 12288 @URI@
bench "4k reads, depth 16"  "$img" qemu-img bench -f raw -c 50000 -d 16 -s 4k -S 12288 @URI@
bench "1M sequential reads" "$img" qemu-img bench -f raw -c 1000 -d 4 -s 1M @URI@
bench "4k writes, depth 16" "$img" qemu-img bench -f raw -w -c 50000 -d 16 -s 4k -S 12288 @URI@
bench "1M sequential writes" "$img" qemu-img bench -f raw -w -c 500 -d 4 -s 1M @URI@
bench "nbdcopy 1 GiB sparse qcow2" "$sparse" nbdcopy @URI@ @OUT@
