//! Pure switching decisions, with no IO: which endpoint a card goes to, which link of an
//! endpoint takes a request, whether a request carries the fields its MTI requires, and which
//! response code a terminal receives for each way a request can fail.
//!
//! Everything here is synchronous and deterministic so that it is tested (and fuzzed) without a
//! runtime; the switch calls it from its pipeline.

pub mod bins;
pub mod links;
pub mod mandatory;
pub mod outcome;

pub use bins::{BinTable, BinTableError, Route};
pub use links::{LinkView, Strategy};
pub use mandatory::{check_mandatory, MissingField};
pub use outcome::Failure;
