//! The read path: mapped data (decrypted when the image is encrypted),
//! zero clusters, compressed clusters, and ranges that fall through to the
//! backing image. Data I/O runs under no metadata lock.

use super::cluster::L1Ref;
use super::l2::Mapping;
use super::Qcow2;
use crate::codec;
use crate::error::{Error, ErrorKind, Result};

impl Qcow2 {
    /// Reads an unallocated range from the backing image (zeros past its end
    /// or without one).
    fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => {
                let bsize = b.size();
                let n = if guest >= bsize { 0 } else { ((bsize - guest).min(buf.len() as u64)) as usize };
                if n > 0 {
                    b.read_at(&mut buf[..n], guest)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => {
                let h = self.header.lock();
                if let Some(name) = &h.backing_file {
                    return Err(self.err(
                        Error::new(
                            ErrorKind::NotFound,
                            format!("guest offset {guest:#x} falls through to the backing file '{name}', which was not opened"),
                        )
                        .with_offset(guest),
                    ));
                }
                drop(h);
                buf.fill(0);
                Ok(())
            }
        }
    }

    pub(crate) fn read_mapped(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_mapped_in(None, buf, offset)
    }

    /// [`read_mapped`](Self::read_mapped) in the active state or a snapshot.
    ///
    /// Whole compressed clusters are decompressed last, all together: a
    /// large read spreads them over the cores (see
    /// [`codec::decompress_units`]).
    pub(crate) fn read_mapped_in(&self, snap: Option<L1Ref<'_>>, buf: &mut [u8], offset: u64) -> Result<()> {
        let total = buf.len();
        let mut rest = buf;
        let mut pos = 0usize;
        let cs = self.geo.cluster_size() as usize;
        // Whole compressed clusters, read and waiting to be decompressed
        // (with their host offsets, for messages).
        let mut units = Vec::new();
        let mut hosts = Vec::new();
        let mut unit_bytes = 0usize;
        while pos < total {
            let guest = offset + pos as u64;
            let (m, n) = self.lookup_in(snap, guest, (total - pos) as u64)?;
            let n = n as usize;
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            match m {
                Mapping::Data { host } => self.read_data(chunk, host, guest)?,
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Unallocated => self.read_backing(chunk, guest)?,
                Mapping::Compressed { host, len } => {
                    let in_cluster = (guest & (cs as u64 - 1)) as usize;
                    if in_cluster == 0 && n == cs {
                        // A whole cluster: decompressed straight into place
                        // below, with the others of this request.
                        let mut input = vec![0u8; len as usize];
                        self.file.read_at(&mut input, host)?;
                        units.push(codec::Unit { input, out: chunk });
                        hosts.push(host);
                        unit_bytes += n;
                    } else {
                        let data = self.read_compressed(host, len)?;
                        chunk.copy_from_slice(&data[in_cluster..in_cluster + n]);
                    }
                }
            }
            pos += n;
        }
        if units.is_empty() {
            return Ok(());
        }
        let decode = codec::Decode { codec: self.compression().codec(), stream: false, what: "cluster" };
        for (r, host) in codec::decompress_units(decode, units, unit_bytes).into_iter().zip(hosts) {
            r.map_err(|e| self.err(e.with_offset(host)))?;
        }
        Ok(())
    }
}
