//! Test peers for cardswitch, usable from tests and from the command line
//! (`cardswitch sim acquirer`, `cardswitch sim terminal`): an acquirer host that approves,
//! declines, delays, drops, disconnects and sends garbage on command, and a terminal load
//! generator that reports throughput and latency without coordinated omission, and a
//! payShield-style HSM with the public Thales test LMK.
//!
//! Depends on the codec only; nothing here knows the switch.

pub mod acquirer;
pub mod clearing;
pub mod hsm;
pub mod terminal;

pub use acquirer::{Acquirer, AcquirerConfig, LedgerEntry, LedgerSummary, Rules};
pub use hsm::{HsmConfig, HsmFaults, HsmSim, HsmStats, TestKeys};
pub use terminal::{Load, Report, Stop, TerminalConfig};
