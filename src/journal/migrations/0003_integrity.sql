-- Transaction integrity: states, duplicate keys, store-and-forward, state history.
-- Portable SQL (PostgreSQL and the embedded SQLite journal).

-- Every row carries its state (see cardswitch::state::TxnState).
ALTER TABLE transactions ADD COLUMN state TEXT NOT NULL DEFAULT 'approved';
-- DE11 as sent to the acquirer (the switch numbers its own requests per link).
ALTER TABLE transactions ADD COLUMN upstream_stan TEXT;
-- For a reversal: the transaction it reverses.
ALTER TABLE transactions ADD COLUMN original_id BIGINT;
-- Amount reversed so far (partial reversals through DE95), minor units.
ALTER TABLE transactions ADD COLUMN amount_reversed_minor BIGINT;
-- DE32 as received.
ALTER TABLE transactions ADD COLUMN acquirer_inst TEXT;

CREATE INDEX transactions_terminal_time ON transactions (terminal_id, stan, transmission_time);

-- Duplicate detection. One row per request key (source, DE32, DE41, DE11, DE7, MTI class),
-- claimed before the request goes anywhere and completed with its reply. Kept for the
-- configured retention (at least 24 hours); shared by every switch node on the database.
CREATE TABLE dedup (
    dkey         TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,           -- keyed hash of DE2, DE3, DE4
    txn_id       BIGINT NOT NULL,
    node         TEXT NOT NULL,
    state        TEXT NOT NULL,           -- in_flight | done
    reply        TEXT,                    -- the decision fields of the reply, sealed (AES-256-GCM)
    created_us   BIGINT NOT NULL
);
CREATE INDEX dedup_created ON dedup (created_us);

-- Store-and-forward: reversals and advices waiting for their endpoint's acknowledgement.
CREATE TABLE saf (
    id            BIGINT PRIMARY KEY,
    endpoint      TEXT NOT NULL,
    order_key     TEXT NOT NULL,          -- PAN HMAC: entries of one card go in order
    kind          TEXT NOT NULL,          -- reversal | advice
    mti           TEXT NOT NULL,
    txn_id        BIGINT,                 -- the transaction whose state the delivery settles
    payload       TEXT NOT NULL,          -- the message, sealed (AES-256-GCM); never in clear
    state         TEXT NOT NULL,          -- pending | delivered | refused | expired
    attempts      INTEGER NOT NULL DEFAULT 0,   -- transmissions so far (the 2nd on are repeats)
    next_at_us    BIGINT NOT NULL,
    expires_us    BIGINT NOT NULL,
    lease_until_us BIGINT NOT NULL DEFAULT 0,
    leased_by     TEXT,
    last_code     TEXT,
    created_us    BIGINT NOT NULL,
    done_us       BIGINT
);
-- Only pending entries are read often: partial indexes stay small as delivered ones pile up.
CREATE INDEX saf_due ON saf (endpoint, next_at_us) WHERE state = 'pending';
CREATE INDEX saf_order ON saf (endpoint, order_key, id) WHERE state = 'pending';
CREATE INDEX saf_txn ON saf (txn_id);

-- State history: one row per change after a transaction's row was written, with its cause.
CREATE TABLE transaction_events (
    txn_id     BIGINT NOT NULL,
    at_us      BIGINT NOT NULL,
    state      TEXT NOT NULL,
    cause      TEXT NOT NULL,
    detail     TEXT
);
CREATE INDEX transaction_events_txn ON transaction_events (txn_id);
