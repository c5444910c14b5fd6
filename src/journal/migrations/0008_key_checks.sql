-- Check values of the journal's keys (PAN HMAC key, data keys by id): stored at the first start,
-- compared at every start, so a node with other keys refuses to start. A check value is an HMAC
-- of a fixed text under the key: it reveals nothing of the key.
CREATE TABLE key_checks (
    name        TEXT PRIMARY KEY,         -- pan_hmac_key | data_key:<id>
    check_value TEXT NOT NULL,
    created_us  BIGINT NOT NULL,
    node        TEXT NOT NULL
);
