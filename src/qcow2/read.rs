//! The read path: mapped data (decrypted when the image is encrypted),
//! zero clusters, compressed clusters, and ranges that fall through to the
//! backing image. Data I/O runs under no metadata lock.

use super::cluster::L1Ref;
use super::l2::Mapping;
use super::Qcow2;
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
    pub(crate) fn read_mapped_in(&self, snap: Option<L1Ref<'_>>, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let (m, n) = self.lookup_in(snap, guest, (buf.len() - pos) as u64)?;
            let n = n as usize;
            let chunk = &mut buf[pos..pos + n];
            match m {
                Mapping::Data { host } => self.read_data(chunk, host, guest)?,
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Unallocated => self.read_backing(chunk, guest)?,
                Mapping::Compressed { host, len } => {
                    let cs = self.geo.cluster_size() as usize;
                    let in_cluster = (guest & (cs as u64 - 1)) as usize;
                    if in_cluster == 0 && n == cs {
                        // A whole cluster: decompress straight into place.
                        self.decompress_into(host, len, chunk)?;
                    } else {
                        let data = self.read_compressed(host, len)?;
                        chunk.copy_from_slice(&data[in_cluster..in_cluster + n]);
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }
}
