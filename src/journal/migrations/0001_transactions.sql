-- The transaction journal: one row per transaction a terminal sent.
-- Portable SQL: the same file builds the PostgreSQL journal and the embedded (SQLite) one.
-- Card data is never stored in clear: the PAN as first 6 / last 4 and a keyed HMAC; no track
-- data, PIN block, CVV or EMV track-equivalent data at all.
CREATE TABLE transactions (
    id              BIGINT PRIMARY KEY,   -- time-ordered, unique across switch nodes
    node            TEXT NOT NULL,        -- the switch node that handled it
    received_us     BIGINT NOT NULL,      -- Unix time in microseconds
    listener        TEXT NOT NULL,
    mti             TEXT NOT NULL,
    processing_code TEXT,
    stan            TEXT,
    rrn             TEXT,
    transmission_time TEXT,               -- DE7
    terminal_id     TEXT,
    merchant_id     TEXT,
    pan_masked      TEXT,
    pan_hmac        TEXT,                 -- hex HMAC-SHA256 of the PAN under the configured key
    amount_minor    BIGINT,
    currency        TEXT,
    route           TEXT,                 -- the matching account-range prefix
    endpoint        TEXT,
    link            TEXT,
    response_code   TEXT NOT NULL,
    decided_by      TEXT NOT NULL,        -- acquirer | switch | timeout
    auth_code       TEXT,
    request_summary TEXT NOT NULL,        -- masked field list of the request
    reply_summary   TEXT NOT NULL,        -- masked field list of the reply
    t_upstream_us   BIGINT,               -- time waiting for the acquirer
    t_total_us      BIGINT NOT NULL       -- from frame received to reply ready
);

CREATE INDEX transactions_rrn ON transactions (rrn);
CREATE INDEX transactions_terminal_stan ON transactions (terminal_id, stan);
