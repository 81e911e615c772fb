//! Internal snapshots: the table on disk (`table`), the operations that
//! change it (`ops`: create, apply, delete), and a read-only view of one
//! snapshot (`view`).
//!
//! Spec: `docs/interop/qcow2.txt`, "Snapshots".

mod ops;
mod table;
mod view;

pub(crate) use table::{encode_table, read_table};
pub use table::{Snapshot, ENTRY_FIXED_LEN};
pub use view::SnapshotView;
