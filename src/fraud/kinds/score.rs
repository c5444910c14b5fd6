//! `score`: the weights of the active rules that fired add up to `decline_at` (declines) or
//! `flag_at` (flags). Evaluated after every other rule.

use anyhow::{bail, Result};

use super::super::model::Compiling;

pub(in crate::fraud) struct Score {
    pub(in crate::fraud) flag_at: u32,
    pub(in crate::fraud) decline_at: u32,
}

impl Score {
    pub(in crate::fraud) fn compile(
        c: &Compiling<'_>,
        flag_at: u32,
        decline_at: u32,
    ) -> Result<(Self, String)> {
        if flag_at > decline_at {
            bail!("{}: flag_at above decline_at", c.what);
        }
        Ok((
            Self {
                flag_at,
                decline_at,
            },
            format!("score at or above {decline_at}"),
        ))
    }
}
