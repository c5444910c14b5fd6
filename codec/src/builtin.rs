//! The dialects shipped in `specs/dialects/`, compiled into the binary so that a bare install
//! works; they are parsed and validated like any other file when first asked for.

use crate::error::SpecError;
use crate::spec::Dialect;

/// Name of the default dialect.
pub const DEFAULT_DIALECT: &str = "iso87-ascii";

/// Names and file texts of the shipped dialects.
pub const BUILTIN_DIALECTS: &[(&str, &str)] = &[
    (
        "iso87-ascii",
        include_str!("../../specs/dialects/iso87-ascii.toml"),
    ),
    (
        "iso87-ascii-hexbitmap",
        include_str!("../../specs/dialects/iso87-ascii-hexbitmap.toml"),
    ),
    (
        "iso87-bcd",
        include_str!("../../specs/dialects/iso87-bcd.toml"),
    ),
    (
        "iso87-ebcdic",
        include_str!("../../specs/dialects/iso87-ebcdic.toml"),
    ),
];

impl Dialect {
    /// A shipped dialect by name.
    ///
    /// # Errors
    /// [`SpecError`] when no shipped dialect has that name (or, which the tests rule out, when its
    /// file does not validate).
    pub fn builtin(name: &str) -> Result<Self, SpecError> {
        let (_, text) = BUILTIN_DIALECTS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| SpecError {
                origin: name.into(),
                field: None,
                problem: format!(
                    "no such dialect; shipped: {}",
                    BUILTIN_DIALECTS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        Self::from_toml(name, text)
    }

    /// A shipped dialect by name, or a dialect file when `name_or_path` ends in `.toml`.
    ///
    /// # Errors
    /// As [`Dialect::builtin`] and [`Dialect::from_file`].
    pub fn load(name_or_path: &str) -> Result<Self, SpecError> {
        if name_or_path.ends_with(".toml") {
            Self::from_file(std::path::Path::new(name_or_path))
        } else {
            Self::builtin(name_or_path)
        }
    }
}
