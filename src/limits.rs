//! Every numeric limit vdisk applies to untrusted images, each with the spec
//! text or QEMU source it mirrors.

/// Smallest qcow2 cluster: 512 bytes (`MIN_CLUSTER_BITS` in QEMU `block/qcow2.h`).
pub const QCOW2_MIN_CLUSTER_BITS: u32 = 9;
/// Largest qcow2 cluster: 2 MiB (`MAX_CLUSTER_BITS` in QEMU `block/qcow2.h`).
pub const QCOW2_MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table: 32 MiB (`QCOW_MAX_L1_SIZE`).
pub const QCOW2_MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table: 8 MiB (`QCOW_MAX_REFTABLE_SIZE`).
pub const QCOW2_MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots (`QCOW_MAX_SNAPSHOTS`).
pub const QCOW2_MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table: 64 MiB (`QCOW_MAX_SNAPSHOTS_SIZE`, 1 KiB per snapshot on average).
pub const QCOW2_MAX_SNAPSHOTS_BYTES: u64 = 64 << 20;
/// Most extra data per snapshot entry (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const QCOW2_MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Longest backing file name (`1023` in `qcow2_do_open`: "Backing file name too long").
pub const QCOW2_MAX_BACKING_NAME: u32 = 1023;
/// Longest backing format name: QEMU refuses a backing format extension of
/// 16 bytes or more (`qcow2_read_extensions`).
pub const QCOW2_MAX_BACKING_FORMAT: u32 = 15;
/// Most persistent bitmaps (`QCOW2_MAX_BITMAPS`).
pub const QCOW2_MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const QCOW2_MAX_BITMAP_DIRECTORY: u64 = 1024 * 65535;
/// Host offsets must stay below 2^56 (L2 entry offset field, bits 9..55).
pub const QCOW2_MAX_HOST_OFFSET: u64 = 1 << 56;
/// Largest virtual size qemu-img creates: 2^63 - 512 is the theoretical
/// bound; L1 size limits keep real images far below.
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64 & !511;
/// Largest host file: `off_t` is signed (`i64::MAX`).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Default L2 cache: enough for the whole image up to 32 MiB, as QEMU's
/// default (`DEFAULT_L2_CACHE_MAX_SIZE` on Linux).
pub const QCOW2_DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// Fewest L2 tables kept in the cache (`MIN_L2_CACHE_SIZE`).
pub const QCOW2_MIN_L2_CACHE_TABLES: usize = 2;
/// Deepest backing chain vdisk opens (a loop or an absurd chain is an error).
pub const MAX_BACKING_DEPTH: usize = 10;

/// Largest vmdk descriptor vdisk reads: 1 MiB, as QEMU (`vmdk_open_desc_file`).
pub const VMDK_MAX_DESCRIPTOR: u64 = 1 << 20;
/// Largest vmdk grain: 0x200000 sectors (1 GiB), as QEMU (`vmdk_open_vmdk4`).
pub const VMDK_MAX_GRAIN_SECTORS: u64 = 0x200000;
/// Largest grain vdisk decompresses: 16 MiB (vdisk's own limit; QEMU has
/// none). Compressed grains are decompressed into a buffer of one grain; the
/// format allows 1 GiB grains, which a hostile file could use to make every
/// read allocate 3 GiB.
pub const VMDK_MAX_COMPRESSED_GRAIN_BYTES: u64 = 16 << 20;
/// Most grain table entries per grain table (spec fixes 512; QEMU accepts 1..=512).
pub const VMDK_MAX_GTES_PER_GT: u32 = 512;
/// Largest grain directory vdisk loads: 64 MiB of entries.
pub const VMDK_MAX_GD_BYTES: u64 = 64 << 20;
/// Most extents in one descriptor.
pub const VMDK_MAX_EXTENTS: usize = 1024;
/// Longest extent file name (QEMU: 511 characters).
pub const VMDK_MAX_FILENAME: usize = 511;
/// Longest `parentFileNameHint`: QEMU copies it into a `PATH_MAX` (4096)
/// buffer and refuses longer names (`vmdk_parent_open`).
pub const VMDK_MAX_PARENT_HINT: usize = 4095;
/// Largest vmdk capacity: 2^32 grains tables' worth is absurd; VMware's
/// limit is 62 TiB. vdisk refuses more than 64 TiB.
pub const VMDK_MAX_CAPACITY: u64 = 64 << 40;

/// Largest pool or volume XML document parsed: 1 MiB (libvirt's own files
/// are a few KiB).
pub const POOL_XML_MAX_BYTES: usize = 1 << 20;
/// Deepest element nesting in pool or volume XML.
pub const POOL_XML_MAX_DEPTH: usize = 32;
/// Most elements in one pool or volume XML document.
pub const POOL_XML_MAX_ELEMENTS: usize = 4096;
/// Most attributes on one XML element.
pub const POOL_XML_MAX_ATTRS: usize = 64;
/// Longest pool or volume name: `NAME_MAX` bytes.
pub const POOL_MAX_NAME_BYTES: usize = 255;
/// Largest probe-cache or format-record file read (larger ones are refused).
pub const POOL_MAX_STATE_FILE: u64 = 256 << 20;

/// Largest VHD guest size: 0xff000000 sectors (2040 GiB), as QEMU
/// (`VHD_MAX_SECTORS` in `block/vpc.c`).
pub const VPC_MAX_SECTORS: u64 = 0xff00_0000;
/// Largest VHD block vdisk opens: 256 MiB (vdisk's limit; QEMU only asks
/// for a power of two of at least 512; real images use 512 KiB or 2 MiB).
pub const VPC_MAX_BLOCK_SIZE: u64 = 256 << 20;
/// Largest VHD block allocation table vdisk loads: 32 MiB (8 Mi entries,
/// 16 TiB of 2 MiB blocks; QEMU's bound is `INT_MAX / 4` entries).
pub const VPC_MAX_BAT_BYTES: u64 = 32 << 20;
/// Longest VHD parent locator read: 64 KiB (a path in UTF-16).
pub const VPC_MAX_PARENT_LOCATOR: usize = 64 << 10;

/// The only VDI block size QEMU opens: 1 MiB (`block/vdi.c`).
pub const VDI_BLOCK_SIZE: u32 = 1 << 20;
/// Most VDI blocks: the largest count QEMU 10 creates and opens
/// (`qemu-img create -f vdi` refuses sizes above 0x1fffff8000000 bytes,
/// 0x1fffff80 blocks of 1 MiB).
pub const VDI_BLOCKS_IN_IMAGE_MAX: u32 = 0x1fff_ff80;
/// Largest VDI block map vdisk loads: 64 MiB (16 Mi blocks, 16 TiB).
pub const VDI_MAX_BMAP_BYTES: u64 = 64 << 20;
/// Largest VHDX log vdisk scans: 1 GiB (the spec allows up to 4 GiB; QEMU
/// and Hyper-V make 1 MiB logs).
pub const VHDX_MAX_LOG_BYTES: u64 = 1 << 30;
/// The log scan reads at most this many times the log's length: entries
/// that claim to overlap cannot make the search quadratic.
pub const VHDX_MAX_LOG_SCAN_FACTOR: u64 = 8;
/// Most a VHDX log replay may grow the file past its length (LastFileOffset).
pub const VHDX_MAX_LOG_GROWTH: u64 = 4 << 30;
/// Largest VHDX BAT vdisk loads: 1 GiB of entries (a 64 TiB disk of 1 MiB
/// blocks needs 512 MiB).
pub const VHDX_MAX_BAT_BYTES: u64 = 1 << 30;
/// Most PBKDF2 iterations vdisk runs for one LUKS key slot or master-key
/// digest: 2^26. `qemu-img create` with its default two-second `iter-time`
/// writes about 9 million (2^23.1) on the machine this was measured on, so
/// this leaves room for CPUs several times faster; a hostile header asking
/// for more (the field allows 2^32 - 1, hours of work per slot) is refused
/// before any derivation.
pub const LUKS_MAX_PBKDF2_ITERATIONS: u32 = 1 << 26;
/// Most PBKDF2 iterations one unlock spends over all the key slots it
/// tries (slot and master-key digest iterations together): 2^27, some 30
/// seconds of SHA-256 at worst, so eight hostile slots cannot make an open
/// take minutes.
pub const LUKS_MAX_UNLOCK_ITERATIONS: u64 = 1 << 27;
/// Most anti-forensic stripes in a LUKS key slot: 4000, what the LUKS
/// specification, QEMU (which refuses any other count) and cryptsetup use;
/// bounds the key material read per slot to 256 KiB.
pub const LUKS_MAX_STRIPES: u32 = 4000;

/// The largest passphrase or key file read (`--passphrase-file`, qemu's
/// `secret,file=`): cryptsetup's default key-file limit is 8 MiB.
pub const MAX_SECRET_FILE: u64 = 8 << 20;
/// Largest LUKS2 header copy (binary header and JSON area): 4 MiB, the
/// largest `hdr_size` the LUKS2 on-disk format allows (16 KiB to 4 MiB in
/// powers of two); both copies are read whole to check their checksums.
pub const LUKS2_MAX_HDR_SIZE: u64 = 4 << 20;
/// Deepest JSON nesting read from a LUKS2 metadata area: 16. cryptsetup's
/// own objects nest four levels (`keyslots` / slot / `kdf` / value);
/// tokens add a few more. Bounds the parser's recursion.
pub const LUKS2_JSON_MAX_DEPTH: usize = 16;
/// Most JSON values in a LUKS2 metadata area: 16384 (a full 32-slot
/// header with tokens has a few hundred).
pub const LUKS2_JSON_MAX_VALUES: usize = 16384;
/// Longest JSON string in a LUKS2 metadata area: 64 KiB (salts and
/// digests are under 100 bytes; token blobs a few KiB).
pub const LUKS2_JSON_MAX_STRING: usize = 64 << 10;
/// Most LUKS2 key slots, digests and tokens each: 32, cryptsetup's
/// `LUKS2_KEYSLOTS_MAX` and `LUKS2_TOKENS_MAX`.
pub const LUKS2_MAX_OBJECTS: usize = 32;
/// Most argon2 memory a LUKS2 key slot may ask for: 1 GiB (in KiB, the
/// unit of the `memory` field). cryptsetup's default is 1 GiB, lowered to
/// half the RAM on smaller machines, so every volume made with its
/// defaults opens; a header asking for more (cryptsetup accepts up to 4
/// GiB when told to) is refused before anything is allocated, so a
/// hostile volume cannot make an opener allocate gigabytes.
pub const LUKS2_ARGON2_MAX_MEMORY_KIB: u32 = 1 << 20;
/// Most argon2 lanes (`cpus`) in a LUKS2 key slot: 16 (cryptsetup uses at
/// most 4 by default). vdisk derives on one thread; lanes only shape the
/// computation.
pub const LUKS2_ARGON2_MAX_LANES: u32 = 16;
/// Most argon2 work in one LUKS2 key slot, as time cost x memory in KiB:
/// 2^24 (16 GiB of memory passes, some 15 seconds on one core).
/// cryptsetup's defaults write time 4 or a little more at 1 GiB (2^22 to
/// 2^23); a slot with little memory and a huge time cost is refused by
/// the same bound.
pub const LUKS2_ARGON2_MAX_WORK: u64 = 1 << 24;
/// Most argon2 work one LUKS2 unlock spends over all the key slots it
/// tries: 2^25 (two slots at the per-slot limit), so several hostile slots
/// cannot make an open take minutes.
pub const LUKS2_MAX_UNLOCK_ARGON2_WORK: u64 = 1 << 25;
