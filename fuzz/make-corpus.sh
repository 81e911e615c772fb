#!/usr/bin/env bash
# Rebuilds the seed corpora in fuzz/corpus/<target>/ from images made by
# qemu-img and qemu-io (tested with QEMU 10.0.2). Run from anywhere:
#
#     bash fuzz/make-corpus.sh
#
# Needs qemu-img, qemu-io (Debian: qemu-utils) and python3. The output is
# deterministic except for qemu's random vmdk CIDs and snapshot dates.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="$here/corpus"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

Q() { qemu-img "$@" >/dev/null; }
IO() { local f="$1" img="$2"; shift 2; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f "$f" "${a[@]}" "$img" >/dev/null; }
SECRET=(--object secret,id=sec0,data=vdisk-fuzz)

rm -rf "$out"
mkdir -p "$out"/{open_qcow2,open_vmdk,vmdk_descriptor,probe,qcow2_ops,open_vpc_vdi}

# A raw source with data, zeros and a compressible run.
python3 - <<'EOF'
import random
r = random.Random(7)
b = bytearray(256 * 1024)
for i in range(0, 16384): b[i] = r.randrange(256)       # incompressible
for i in range(65536, 65536 + 8192): b[i] = 0x41        # compressible
b[200000:200010] = b"hello, vdisk"[:10]
open("src.raw", "wb").write(b)
EOF

# ---- qcow2 --------------------------------------------------------------
q2() { # name, create options, size
    Q create -f qcow2 -o "$2" "$1.qcow2" "$3"
}
q2 v3-c512 cluster_size=512 256k
IO qcow2 v3-c512.qcow2 'write -P 0x11 0 1k' 'write -P 0x22 100k 3k' 'write -z 8k 4k'
q2 v2-c512 cluster_size=512,compat=0.10 256k
IO qcow2 v2-c512.qcow2 'write -P 0x33 512 2k' 'write -P 0x44 200k 512'
for rb in 1 2 4 8 32 64; do
    q2 "v3-c512-rc$rb" "cluster_size=512,refcount_bits=$rb" 128k
    IO qcow2 "v3-c512-rc$rb.qcow2" 'write -P 0x55 0 2k' 'write -P 0x66 64k 1k'
done
q2 v3-c4k cluster_size=4096 1M
IO qcow2 v3-c4k.qcow2 'write -P 0x77 4k 8k' 'write -z 64k 8k' 'write -P 0x78 1020k 4k'
q2 v3-c4k-lazy cluster_size=4096,lazy_refcounts=on 256k
IO qcow2 v3-c4k-lazy.qcow2 'write -P 0x79 0 4k' 'abort' || true   # leaves the dirty bit
q2 v3-c512-prealloc cluster_size=512,preallocation=metadata 16k
IO qcow2 v3-c512-prealloc.qcow2 'write -z 1k 2k' 'write -P 0x7a 4k 1k'
Q convert -c -f raw -O qcow2 -o cluster_size=4096 src.raw v3-c4k-zlib.qcow2
Q convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd src.raw v3-c4k-zstd.qcow2
Q convert -c -f raw -O qcow2 -o cluster_size=512,compat=0.10 src.raw v2-c512-zlib.qcow2
Q create -f qcow2 -o cluster_size=512 "${SECRET[@]}" -o encrypt.format=aes,encrypt.key-secret=sec0 v3-c512-aes.qcow2 64k
qemu-io "${SECRET[@]}" --image-opts "driver=qcow2,file.filename=v3-c512-aes.qcow2,encrypt.key-secret=sec0" -c 'write -P 0x7b 0 3k' >/dev/null
Q create -f qcow2 -o cluster_size=512,compat=0.10 "${SECRET[@]}" -o encrypt.format=aes,encrypt.key-secret=sec0 v2-c512-aes.qcow2 64k
q2 v3-c512-snap cluster_size=512 128k
IO qcow2 v3-c512-snap.qcow2 'write -P 0x01 0 4k'
Q snapshot -c first v3-c512-snap.qcow2
IO qcow2 v3-c512-snap.qcow2 'write -P 0x02 2k 4k'
Q snapshot -c "second one" v3-c512-snap.qcow2
IO qcow2 v3-c512-snap.qcow2 'write -z 0 1k'
q2 v2-c512-snap cluster_size=512,compat=0.10 64k
IO qcow2 v2-c512-snap.qcow2 'write -P 0x03 1k 1k'
Q snapshot -c s1 v2-c512-snap.qcow2
IO qcow2 v2-c512-snap.qcow2 'write -P 0x04 1k 512'
q2 base cluster_size=512 128k
IO qcow2 base.qcow2 'write -P 0x05 0 16k'
Q create -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 v3-c512-backing.qcow2 128k
IO qcow2 v3-c512-backing.qcow2 'write -P 0x06 1000 2000'
Q create -f qcow2 -o cluster_size=512,compat=0.10 -b base.qcow2 -F qcow2 v2-c512-backing.qcow2 128k
Q create -f qcow2 -o cluster_size=4096 -u -b "$(printf 'long-backing-name-%.0s' {1..40}).qcow2" -F qcow2 v3-c4k-longbacking.qcow2 64k
q2 v3-c512-datafile cluster_size=512,data_file=v3-c512-datafile.raw,data_file_raw=on 64k
IO qcow2 v3-c512-datafile.qcow2 'write -P 0x07 0 2k'
# Larger clusters: these cannot be smaller than four clusters (header,
# refcount table and block, L1), so they are the corpus's few big files.
q2 v3-c16k-extl2 cluster_size=16384,extended_l2=on 512k
IO qcow2 v3-c16k-extl2.qcow2 'write -P 0x08 4k 2k' 'write -z 8k 1k'
q2 v3-c64k cluster_size=65536 1M
q2 v3-c2M-header cluster_size=2M 4M
head -c 4096 v3-c2M-header.qcow2 > v3-c2M-header-only.qcow2   # header only (tables past EOF)
rm v3-c2M-header.qcow2
for f in *.qcow2; do cp "$f" "$out/open_qcow2/$f"; done

# ---- vmdk ---------------------------------------------------------------
Q create -f vmdk vm-sparse-empty.vmdk 1M
Q create -f vmdk vm-sparse.vmdk 1M
IO vmdk vm-sparse.vmdk 'write -P 0x0a 0 2k'
Q create -f vmdk -o zeroed_grain=on vm-sparse-zg.vmdk 1M
IO vmdk vm-sparse-zg.vmdk 'write -z 0 64k'
python3 -c 'import sys; sys.stdout.buffer.write(bytes((i * 7 // 512) % 251 for i in range(131072)))' > src128k.raw
Q convert -f raw -O vmdk -o subformat=streamOptimized src128k.raw vm-stream.vmdk
Q create -f vmdk -o subformat=monolithicFlat vm-flat.vmdk 8k
IO vmdk vm-flat.vmdk 'write -P 0x0b 0 1k'
Q create -f vmdk -o subformat=twoGbMaxExtentFlat vm-2gbflat.vmdk 4k
Q create -f vmdk -o subformat=twoGbMaxExtentSparse vm-2gbsparse.vmdk 1M
Q create -f vmdk -b vm-sparse.vmdk -F vmdk vm-delta.vmdk 1M
for f in vm-sparse-empty vm-sparse vm-sparse-zg vm-stream vm-delta; do
    cp "$f.vmdk" "$out/open_vmdk/$f.vmdk"
done
# Multi-file inputs: the descriptor, then each extent after a marker line.
bundle() { # out, descriptor, extents...
    local o="$1" d="$2"; shift 2
    { cat "$d"; for e in "$@"; do printf '\n--vdisk-fuzz-file %s\n' "$e"; cat "$e"; done; } > "$o"
}
bundle "$out/open_vmdk/vm-flat.bundle" vm-flat.vmdk vm-flat-flat.vmdk
bundle "$out/open_vmdk/vm-2gbflat.bundle" vm-2gbflat.vmdk vm-2gbflat-f001.vmdk
bundle "$out/open_vmdk/vm-2gbsparse.bundle" vm-2gbsparse.vmdk vm-2gbsparse-s001.vmdk

# Descriptors: stand-alone ones, and the ones embedded in sparse extents.
python3 - "$out/vmdk_descriptor" vm-flat.vmdk vm-2gbflat.vmdk vm-2gbsparse.vmdk vm-delta.vmdk vm-sparse.vmdk vm-stream.vmdk <<'EOF'
import sys, struct
dst = sys.argv[1]
for f in sys.argv[2:]:
    b = open(f, "rb").read()
    if b[:4] == b"KDMV":
        off, size = struct.unpack_from("<QQ", b, 28)
        b = b[off * 512:(off + size) * 512].split(b"\0")[0]
    open(f"{dst}/{f}.txt", "wb").write(b)
EOF
printf '# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType="custom"\r\n\r\nRW 2048 FLAT "a.img" 0\r\nRDONLY 1024 SPARSE "b.vmdk"\r\nNOACCESS 10 ZERO\r\nRW 8 VMFS "c.img"\r\n\r\nddb.adapterType = "lsilogic"\r\nddb.uuid.image = "x y"\r\n' > "$out/vmdk_descriptor/custom-crlf.txt"

# ---- probe --------------------------------------------------------------
for f in "$out"/open_qcow2/v3-c512.qcow2 "$out"/open_qcow2/v2-c512.qcow2 "$out"/open_vmdk/vm-sparse.vmdk; do
    head -c 2048 "$f" > "$out/probe/$(basename "$f").head"
done
cp "$out/vmdk_descriptor/vm-flat.vmdk.txt" "$out/probe/"
printf 'QFI\xfb\0\0\0\x01' > "$out/probe/qcow1-magic"
printf 'COWD\1\0\0\0' > "$out/probe/cowd-magic"
printf '\n\n# comment\n  version=3\n' > "$out/probe/descriptor-v3"
head -c 4096 src.raw > "$out/probe/raw"

# ---- qcow2_ops ----------------------------------------------------------
# Byte 0 even: a fresh image from 4 option bytes, then ops. Byte 0 odd: a
# u16 LE image length, the image (one of the seeds above), then ops.
python3 - "$out/qcow2_ops" "$out/open_qcow2" <<'EOF'
import os, random, struct, sys
dst, images = sys.argv[1], sys.argv[2]
r = random.Random(11)
def script(n):
    s = bytearray()
    for _ in range(n):
        op = r.randrange(16)
        s.append(op)
        s += bytes(r.randrange(256) for _ in range(8))
    return bytes(s)
# Option bytes: a = cluster(0-1) | v2(2) | extl2(3) | lazy(4) | zstd(5);
# b = refcount order(0-2) | backing(3) | prealloc(4) | aes(5) | data file(6) | raw(7);
# then a u16 size.
opts = [
    (0x00, 0x04), (0x01, 0x04), (0x02, 0x04), (0x03, 0x04),  # cluster sizes, 16-bit refcounts
    (0x04, 0x04), (0x05, 0x0c),                              # v2, v2 + backing
    (0x0a, 0x04), (0x0a, 0x1c), (0x0b, 0x0c),                # extended L2 (+ prealloc, backing)
    (0x11, 0x00), (0x21, 0x01), (0x01, 0x06), (0x01, 0x24),  # lazy, zstd, refcount widths, AES
    (0x01, 0x44), (0x01, 0xc4), (0x00, 0x14), (0x01, 0x0c),  # data file (raw), prealloc, backing
]
for i, (a, b) in enumerate(opts):
    size = r.randrange(1, 4096)
    data = bytes([0, a, b]) + struct.pack("<H", size) + script(r.randrange(8, 40))
    open(f"{dst}/fresh-{i:02d}", "wb").write(data)
for name in sorted(os.listdir(images)):
    img = open(os.path.join(images, name), "rb").read()
    if len(img) > 65535:
        continue
    data = bytes([1]) + struct.pack("<H", len(img)) + img + script(r.randrange(8, 24))
    open(f"{dst}/hostile-{name}", "wb").write(data)
EOF

find "$out" -type f -size +64k -printf 'over 64 KiB: %P (%s bytes)\n'
du -sh "$out"

# VHD (vpc) and VDI: empty dynamic images, a small fixed VHD, force_size.
Q create -f vpc "$out/open_vpc_vdi/s-dyn.vhd" 1M
Q create -f vpc -o subformat=fixed "$out/open_vpc_vdi/s-fixed.vhd" 32K
Q create -f vpc -o force_size=on "$out/open_vpc_vdi/s-force.vhd" 64K
Q create -f vdi "$out/open_vpc_vdi/s-dyn.vdi" 8M
# ---- open_vhdx ----------------------------------------------------------
# VHDX images are stored as runs of their non-zero 4 KiB sectors
# (`VHDXRUNS` + (u32 offset, u32 length, bytes)...; see
# vdisk::testing::fuzzing::vhdx_image).
mkdir -p "$out/open_vhdx"
vx() { # name, create options, size, qemu-io commands...
    local name="$1" opts="$2" size="$3"; shift 3
    Q create -f vhdx ${opts:+-o "$opts"} "$name.vhdx" "$size"
    [ $# -eq 0 ] || IO vhdx "$name.vhdx" "$@"
}
vx vhdx-empty "" 8M
vx vhdx-dyn block_size=1M 6M 'write -P 0x11 0 300' 'write -P 0x22 1M 5k' 'write -z 2M 1M'
vx vhdx-zero-off block_size=1M,block_state_zero=off 4M 'write -P 0x33 100k 8k' 'write -P 0x34 3M 1k'
vx vhdx-fixed subformat=fixed,block_state_zero=off,block_size=1M 3M 'write -P 0x44 512 1k'
vx vhdx-log2m block_size=1M,log_size=2M 2M 'write -P 0x55 1M 4k'
printf 'vhdxfile' > vhdx-magic-only.vhdx
python3 - "$out/open_vhdx" <<'EOF'
import glob, os, struct, sys
dst = sys.argv[1]
def crc32c(b):
    crc = 0xffffffff
    for x in b:
        crc ^= x
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82f63b78 if crc & 1 else crc >> 1
    return crc ^ 0xffffffff
# QEMU leaves its last log entries in the log and clears the header's log
# GUID: putting the GUID back makes an image whose log needs a replay.
img = bytearray(open("vhdx-dyn.vhdx", "rb").read())
guid = img[(1 << 20) + 32:(1 << 20) + 48]
assert img[1 << 20:(1 << 20) + 4] == b"loge"
for h in (64 << 10, 128 << 10):
    img[h + 48:h + 64] = guid
    img[h + 4:h + 8] = b"\0\0\0\0"
    img[h + 4:h + 8] = struct.pack("<I", crc32c(bytes(img[h:h + 4096])))
open("vhdx-dirty-log.vhdx", "wb").write(img)
def runs(img):
    out = bytearray(b"VHDXRUNS")
    for i in range(0, len(img), 4096):
        s = img[i:i + 4096]
        if any(s) or i + 4096 >= len(img):
            out += struct.pack("<II", i, len(s)) + s
    return bytes(out)
for f in sorted(glob.glob("vhdx-*.vhdx")):
    open(os.path.join(dst, os.path.basename(f) + ".runs"), "wb").write(runs(open(f, "rb").read()))
EOF
