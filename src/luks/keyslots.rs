//! Key slots
