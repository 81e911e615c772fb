//! Compressed clusters: reading them (decompressed into one cluster, the
//! last few kept in a small cache) and writing them (`write_compressed`,
//! packed byte-wise after the previous compressed cluster as QEMU packs
//! them).
//!
//! Spec: `docs/interop/qcow2.txt`, "Compressed Clusters Descriptor".

use std::sync::Arc;

use super::alloc::AllocState;
use super::l2::{L2Entry, OFLAG_COMPRESSED};
use super::Qcow2;
use crate::codec;
use crate::device::{check_request, BlockDevice};
use crate::error::{Error, Result};

impl Qcow2 {
    /// Decompresses the cluster at `host` into `out` (one cluster). `len`
    /// is at most 2^(cluster_bits - 8) sectors: at most 2 clusters.
    pub(crate) fn decompress_into(&self, host: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let mut input = vec![0u8; len as usize];
        self.file.read_at(&mut input, host)?;
        codec::decompress_exact(self.compression().codec(), &input, out, "cluster")
            .map_err(|e| self.err(e.with_offset(host)))
    }

    /// Reads a compressed cluster (whole), from the small cache if possible.
    pub(crate) fn read_compressed(&self, host: u64, len: u64) -> Result<Arc<[u8]>> {
        self.zcache.get_or_load(host, || {
            let mut out = vec![0u8; self.geo.cluster_size() as usize];
            self.decompress_into(host, len, &mut out)?;
            Ok(out)
        })
    }

    /// Writes whole clusters compressed; see [`crate::BlockDevice::write_compressed`].
    pub(crate) fn write_compressed_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.size();
        check_request(offset, buf.len() as u64, size)?;
        let cs = self.geo.cluster_size();
        if !offset.is_multiple_of(cs) || (!(buf.len() as u64).is_multiple_of(cs) && offset + buf.len() as u64 != size) {
            return Err(Error::invalid_argument(format!(
                "compressed writes must cover whole clusters of {cs} bytes (offset {offset}, length {})",
                buf.len()
            )));
        }
        if self.crypt.is_some() {
            return Err(self.err(Error::unsupported("compressed writes are not supported for encrypted images")));
        }
        if self.geo.data_file {
            return Err(self.err(Error::unsupported("compressed writes are not supported with an external data file")));
        }
        self.track_write(offset, buf.len() as u64)?;
        for (k, chunk) in buf.chunks(cs as usize).enumerate() {
            let guest = offset + k as u64 * cs;
            let mut cluster = chunk.to_vec();
            cluster.resize(cs as usize, 0);
            match codec::compress(self.compression().codec(), &cluster, cs as usize - 1)? {
                None => self.write_impl(chunk, guest)?,
                Some(z) => self.link_compressed(guest, &z)?,
            }
        }
        self.maybe_flush_frees()
    }

    fn link_compressed(&self, guest: u64, z: &[u8]) -> Result<()> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let c = guest >> cb;
        let l2e = geo.l2_entries();
        let _g = self.enter_active()?;
        let a = self.alloc_lock()?;
        let mut a = self.wait_inflight(a, c, c);
        self.mark_dirty_if_lazy(&mut a)?;
        let t = self.l2_for_write(&mut a, c / l2e)?;
        let host = self.alloc_bytes(&mut a, z.len() as u64)?;
        if host > geo.compressed_offset_mask() {
            return Err(Error::limit("compressed data would lie beyond the offsets a descriptor can hold"));
        }
        self.file.write_at(z, host)?;
        let nb = ((host + z.len() as u64 - 1) >> 9) - (host >> 9);
        let word = OFLAG_COMPRESSED | host | (nb << geo.csize_shift());
        let i = (c % l2e) as usize;
        let old = t.get(&geo, i);
        self.release_entry(&mut a, old, c);
        t.set(&geo, i, L2Entry { word, bitmap: 0 });
        a.data_written = true;
        if self.map.read().l2.over_capacity() {
            self.flush_meta(&mut a)?;
        }
        Ok(())
    }

    /// Allocates `len` (< one cluster) bytes for compressed data, packing
    /// them after the previous compressed cluster; each host cluster's
    /// refcount counts the compressed clusters that touch it.
    fn alloc_bytes(&self, a: &mut AllocState, len: u64) -> Result<u64> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let cur = a.compressed_next;
        if cur != 0 && !cur.is_multiple_of(cs) {
            let cl = cur / cs;
            let rc = a.rc.get(file, cl)?;
            // A full refcount (narrow widths) starts a new cluster, as QEMU does.
            if rc > 0 && rc < a.rc.max_refcount() {
                let end = cur + len;
                if end <= (cl + 1) * cs {
                    a.rc.add(file, cl, 1)?;
                    a.compressed_next = end;
                    return Ok(cur);
                }
                let next = self.alloc_clusters(a, 1)?;
                if next == (cl + 1) * cs {
                    a.rc.add(file, cl, 1)?;
                    a.compressed_next = end;
                    return Ok(cur);
                }
                a.compressed_next = next + len;
                return Ok(next);
            }
        }
        let c = self.alloc_clusters(a, 1)?;
        a.compressed_next = c + len;
        Ok(c)
    }
}
