-- Write-ahead records of forwarded requests: written (and committed) before a request goes on
-- an acquirer link, deleted by the commit that records the transaction's outcome. What is left
-- after a crash is reversed as the acquirer knows it: MTI, upstream STAN, DE7, DE32, DE33 as
-- sent. The request is kept sealed (AES-256-GCM), without PIN block, track or chip data.
CREATE TABLE forwards (
    txn_id            BIGINT NOT NULL,
    endpoint          TEXT NOT NULL,
    link              TEXT NOT NULL,
    mti               TEXT NOT NULL,
    upstream_stan     TEXT NOT NULL,
    transmission_time TEXT,
    acquirer_id       TEXT,
    forwarding_id     TEXT,
    amount_minor      BIGINT,
    currency          TEXT,
    terminal_id       TEXT,
    terminal_stan     TEXT,
    terminal_time     TEXT,
    rrn               TEXT,
    dkey              TEXT,
    listener          TEXT NOT NULL,
    pan_hmac          TEXT,
    payload           TEXT NOT NULL,
    node              TEXT NOT NULL,
    created_us        BIGINT NOT NULL,
    PRIMARY KEY (txn_id, upstream_stan)
);
CREATE INDEX forwards_node ON forwards (node, created_us);
