//! Keys received in key exchanges, kept under the LMK (table `security_keys`).

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
        const SQL_PG: &str =
            "INSERT INTO security_keys (owner, kind, key_lmk, check_value, changed_at_us, node) \
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, kind) DO UPDATE SET \
            key_lmk = EXCLUDED.key_lmk, check_value = EXCLUDED.check_value, \
            changed_at_us = EXCLUDED.changed_at_us, node = EXCLUDED.node";
        const SQL_LITE: &str =
            "INSERT INTO security_keys (owner, kind, key_lmk, check_value, changed_at_us, node) \
            VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, kind) DO UPDATE SET \
            key_lmk = excluded.key_lmk, check_value = excluded.check_value, \
            changed_at_us = excluded.changed_at_us, node = excluded.node";
        let now = now_us();
        let node: &str = &self.node;
        match &self.backend {
            Backend::Postgres(p) => {
                sqlx::query(SQL_PG)
                    .bind(owner)
                    .bind(kind)
                    .bind(key_lmk)
                    .bind(check_value)
                    .bind(now)
                    .bind(node)
                    .execute(p)
                    .await?;
            }
            Backend::Sqlite(p) => {
                sqlx::query(SQL_LITE)
                    .bind(owner)
                    .bind(kind)
                    .bind(key_lmk)
                    .bind(check_value)
                    .bind(now)
                    .bind(node)
                    .execute(p)
                    .await?;
            }
        }
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
        const SQL_PG: &str =
            "SELECT key_lmk, check_value FROM security_keys WHERE owner = $1 AND kind = $2";
        const SQL_LITE: &str =
            "SELECT key_lmk, check_value FROM security_keys WHERE owner = ? AND kind = ?";
        match &self.backend {
            Backend::Postgres(p) => {
                sqlx::query_as(SQL_PG)
                    .bind(owner)
                    .bind(kind)
                    .fetch_optional(p)
                    .await
            }
            Backend::Sqlite(p) => {
                sqlx::query_as(SQL_LITE)
                    .bind(owner)
                    .bind(kind)
                    .fetch_optional(p)
                    .await
            }
        }
    }
}
