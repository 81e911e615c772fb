//! Internal snapshots: the table on disk (`table`), the operations that
//! change it (`ops`: create, apply, delete), and a read-only view of one
//! snapshot (`view`).
//!
//! Spec: `docs/interop/qcow2.txt`, "Snapshots".

mod ops;
mod table;
mod view;

pub use table::Snapshot;
pub(crate) use table::{encode_table, read_table};
pub use view::SnapshotView;
