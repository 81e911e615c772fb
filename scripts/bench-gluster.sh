#!/usr/bin/env bash
# GlusterFS benchmark: vdisk against qemu-img on the same files of a
# single-node GlusterFS volume mounted through FUSE by a vdisk `netfs` pool
# (libvirt's options: nodev,nosuid,noexec,direct-io-mode=1). Prints one line
# per workload: the median wall seconds and CPU seconds (user + system of
# the tool's process) of each tool over RUNS alternating passes, and the
# speed ratio (qemu-img's median / vdisk's: above 1, vdisk is faster).
#
#   scripts/bench-gluster.sh [path/to/vdisk]   (default: target/release/vdisk)
#   RUNS=5 (passes per tool), BRICK_DIR=/var/tmp (where the brick lives)
#
# Needs root, /dev/fuse and glusterfs-server + glusterfs-client. Starts
# `glusterd -N` unless one answers, makes a volume `vdiskbench` on a brick
# under BRICK_DIR (or reuses one of that name that is started), and stops
# what it started (by pid), deleting what it made.
set -euo pipefail
VDISK=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/vdisk}")
RUNS=${RUNS:-5}
[ "$(id -u)" -eq 0 ] || { echo "bench-gluster: needs root (mount, glusterd)" >&2; exit 1; }
command -v glusterd >/dev/null || { echo "bench-gluster: apt-get install -y --no-install-recommends glusterfs-server glusterfs-client" >&2; exit 1; }

dir=$(mktemp -d)
brick=$(mktemp -d "${BRICK_DIR:-/var/tmp}/vdiskbench-brick.XXXXXX")
vol=vdiskbench
host=$(cat /proc/sys/kernel/hostname)
started_glusterd=""
made_volume=""
export VDISK_CONFIG_DIR=$dir/cfg VDISK_LIBVIRT_DIR=""
cleanup() {
    set +e
    [ -f "$dir/serve.pid" ] && { kill "$(cat "$dir/serve.pid")"; wait "$(cat "$dir/serve.pid")" 2>/dev/null; }
    mountpoint -q "$dir/mnt" && "$VDISK" pool-destroy bench >/dev/null
    mountpoint -q "$dir/mnt" && umount "$dir/mnt"
    if [ -n "$made_volume" ]; then
        gluster --mode=script volume stop "$vol" force >/dev/null 2>&1
        gluster --mode=script volume delete "$vol" >/dev/null 2>&1
    fi
    [ -n "$started_glusterd" ] && { kill "$started_glusterd"; wait "$started_glusterd" 2>/dev/null; }
    rm -rf "$dir" "$brick"
}
trap cleanup EXIT

if ! gluster --mode=script volume list >/dev/null 2>&1; then
    glusterd -N --log-file=/dev/null & started_glusterd=$!
    for _ in $(seq 100); do gluster --mode=script volume list >/dev/null 2>&1 && break; sleep 0.2; done
fi
if ! gluster --mode=script volume info "$vol" 2>/dev/null | grep -q '^Status: Started'; then
    gluster --mode=script volume create "$vol" "$host:$brick/b" force >/dev/null 2>&1
    made_volume=1
    gluster --mode=script volume start "$vol" >/dev/null 2>&1
fi

# The pool mounts the volume as libvirt would.
mkdir -p "$dir/mnt"
cat > "$dir/bench.xml" <<EOF
<pool type='netfs'>
  <name>bench</name>
  <source><host name='$host'/><dir path='/$vol'/><format type='glusterfs'/></source>
  <target><path>$dir/mnt</path></target>
</pool>
EOF
"$VDISK" pool-define "$dir/bench.xml" >/dev/null
"$VDISK" pool-start bench >/dev/null
m=$dir/mnt
grep " $m " /proc/self/mounts
uptime

# 1 GiB of random data (not sparse), as raw and as qcow2.
head -c 1G /dev/urandom > "$m/src.raw"
qemu-img convert -f raw -O qcow2 "$m/src.raw" "$m/src.qcow2"

# timed OUT CMD...: runs CMD, appends "wall cpu" to OUT.
timed() {
    local out=$1; shift
    /usr/bin/time -o "$dir/t" -f '%e %U %S' "$@" >/dev/null
    awk '{ printf "%.3f %.2f\n", $1, $2 + $3 }' "$dir/t" >> "$out"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf '%-40s %9s %7s %10s %7s %7s\n' workload vdisk-s cpu-s qemu-img-s cpu-s speed
# bench LABEL SETUP ARGS...: ARGS with @TOOL@ replaced by vdisk or
# qemu-img; SETUP (a shell snippet) runs before every pass, untimed.
bench() {
    local label=$1 setup=$2; shift 2
    rm -f "$dir/vdisk.t" "$dir/qemu.t"
    for _ in $(seq "$RUNS"); do
        eval "$setup"
        timed "$dir/vdisk.t" "${@//@TOOL@/$VDISK}"
        eval "$setup"
        timed "$dir/qemu.t" "${@//@TOOL@/qemu-img}"
    done
    local vs vc qs qc
    vs=$(cut -d' ' -f1 "$dir/vdisk.t" | median); vc=$(cut -d' ' -f2 "$dir/vdisk.t" | median)
    qs=$(cut -d' ' -f1 "$dir/qemu.t" | median); qc=$(cut -d' ' -f2 "$dir/qemu.t" | median)
    printf '%-40s %9.3f %7.2f %10.3f %7.2f %6.2fx\n' "$label" "$vs" "$vc" "$qs" "$qc" "$(awk -v v="$vs" -v q="$qs" 'BEGIN { print q / v }')"
}
# -t writeback on both: vdisk convert always flushes its output before it
# returns; qemu-img's default target cache (unsafe) would skip that flush.
bench "convert raw -> qcow2, 1 GiB" 'rm -f "$m/out.qcow2"' @TOOL@ convert -t writeback -f raw -O qcow2 "$m/src.raw" "$m/out.qcow2"
bench "convert qcow2 -> raw, 1 GiB" 'rm -f "$m/out.raw"' @TOOL@ convert -t writeback -f qcow2 -O raw "$m/src.qcow2" "$m/out.raw"
bench "bench 4k reads, depth 1, 20000" : @TOOL@ bench -f qcow2 -t writeback -c 20000 -d 1 -s 4k -S 12288 "$m/src.qcow2"
bench "bench 4k reads, depth 16, 50000" : @TOOL@ bench -f qcow2 -t writeback -c 50000 -d 16 -s 4k -S 12288 "$m/src.qcow2"
rm -f "$m/out.qcow2" "$m/out.raw"

# activate()/inactivate() of a 1 TiB qcow2 through `vdisk handoff`, and the
# same round trip without work (`status`) for the process and socket cost.
qemu-img create -q -f qcow2 "$m/big.qcow2" 1T
"$VDISK" serve --inactive --control "$dir/ctl" -k "$dir/nbd.sock" -f qcow2 "$m/big.qcow2" & echo $! > "$dir/serve.pid"
for _ in $(seq 100); do [ -S "$dir/ctl" ] && break; sleep 0.05; done
rm -f "$dir/act" "$dir/inact" "$dir/stat"
ms() { local t0 t1; t0=$(date +%s%N); "$VDISK" handoff "$dir/ctl" "$1" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000)); }
for _ in $(seq 10); do
    ms activate >> "$dir/act"
    ms inactivate >> "$dir/inact"
    ms status >> "$dir/stat"
done
printf 'handoff, 1 TiB qcow2 (median of 10, ms, incl. the handoff process): activate %.2f  inactivate %.2f  status %.2f\n' \
    "$(median < "$dir/act" | awk '{ print $1 / 1000 }')" "$(median < "$dir/inact" | awk '{ print $1 / 1000 }')" \
    "$(median < "$dir/stat" | awk '{ print $1 / 1000 }')"
