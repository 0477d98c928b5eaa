//! Profiles' business rules: pure functions, no I/O (SPEC 4.1).
pub mod customer;
pub mod identity;
pub mod masking;
pub mod merge;
pub mod quality;
pub mod records;
