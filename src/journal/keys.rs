//! Keys received in key exchanges, kept under the LMK (table `security_keys`). On PostgreSQL
//! the write also notifies channel [`super::notify::KEYS`] with the owner's name, in the same
//! statement, so that every node follows a key exchange that reached one of them at once.

use super::db::Statement;
use super::notify::KEYS;
use super::{now_us, Backend, Journal};

impl Journal {
    /// Keeps a key received for `owner` (an endpoint), replacing the one before.
    ///
    /// # Errors
    /// The database refuses the write.
    pub async fn save_key(
        &self,
        owner: &str,
        kind: &str,
        key_lmk: &str,
        check_value: &str,
    ) -> Result<(), sqlx::Error> {
        const SQL: &str =
            "INSERT INTO security_keys (owner, kind, key_lmk, check_value, changed_at_us, node) \
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, kind) DO UPDATE SET \
            key_lmk = excluded.key_lmk, check_value = excluded.check_value, \
            changed_at_us = excluded.changed_at_us, node = excluded.node";
        let sql = match self.backend() {
            // The notification is delivered when the write commits, never without it.
            Backend::Postgres(_) => format!(
                "WITH kept AS ({SQL} RETURNING owner) \
                 SELECT pg_notify('{KEYS}', owner) FROM kept"
            ),
            Backend::Sqlite(_) => SQL.to_owned(),
        };
        let st = Statement::new(sql)
            .bind(owner)
            .bind(kind)
            .bind(key_lmk)
            .bind(check_value)
            .bind(now_us())
            .bind(self.node());
        self.backend().execute(&st).await?;
        Ok(())
    }

    /// The key last received for `owner`, if any: under the LMK, and its check value.
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn load_key(
        &self,
        owner: &str,
        kind: &str,
    ) -> Result<Option<(String, String)>, sqlx::Error> {
        let st = Statement::new(
            "SELECT key_lmk, check_value FROM security_keys WHERE owner = $1 AND kind = $2",
        )
        .bind(owner)
        .bind(kind);
        match self.backend().fetch_optional(&st).await? {
            Some(r) => Ok(Some((r.get(0)?, r.get(1)?))),
            None => Ok(None),
        }
    }
}
