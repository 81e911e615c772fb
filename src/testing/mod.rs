//! The workshop: test doubles and fuzz target bodies, compiled only with
//! the `test-utils` feature (the integration tests and the fuzz crate turn
//! it on). A library user with default features sees none of it.

pub mod faulty;
pub mod fuzzing;

pub use faulty::{FaultMode, FaultyStorage, Survivors};

/// The crate's deflate/zstd codec, for tests that build hostile compressed
/// data (bombs, grains made by hand).
pub mod codec {
    pub use crate::codec::{compress, deflate_bound, Codec};
}
