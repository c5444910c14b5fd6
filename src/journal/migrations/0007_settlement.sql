-- Settlement and reconciliation. Portable SQL (PostgreSQL and the embedded SQLite journal).

-- Every row carries the business date it settles on (YYYY-MM-DD: the endpoint's date, see
-- cardswitch::settlement) and the terminal's batch number.
ALTER TABLE transactions ADD COLUMN business_date TEXT;
ALTER TABLE transactions ADD COLUMN batch_number TEXT;
CREATE INDEX transactions_endpoint_date ON transactions (endpoint, business_date);
CREATE INDEX transactions_terminal_batch ON transactions (terminal_id, batch_number);

-- The open business date of each endpoint; shared by every switch node on the database.
CREATE TABLE business_dates (
    endpoint      TEXT PRIMARY KEY,
    business_date TEXT NOT NULL,
    opened_us     BIGINT NOT NULL
);

-- Every cutover: which date closed, which opened, and why (0800/201 or the configured time).
CREATE TABLE cutovers (
    endpoint   TEXT NOT NULL,
    closed     TEXT NOT NULL,
    opened     TEXT NOT NULL,
    cause      TEXT NOT NULL,
    node       TEXT NOT NULL,
    at_us      BIGINT NOT NULL
);
CREATE INDEX cutovers_endpoint ON cutovers (endpoint, at_us);

-- Terminal batches closed by an agreeing 0500/0520.
CREATE TABLE batches (
    terminal_id   TEXT NOT NULL,
    batch_number  TEXT NOT NULL,
    state         TEXT NOT NULL,          -- closed
    business_date TEXT,
    totals        TEXT NOT NULL,          -- the agreed totals (JSON)
    uploaded      BIGINT NOT NULL,        -- items uploaded (0320) before it closed
    exceptions    TEXT,                   -- uploaded items and journal rows that differ (JSON)
    closed_us     BIGINT NOT NULL,
    PRIMARY KEY (terminal_id, batch_number)
);

-- Clearing-file reconciliations: one run per (endpoint, business date, file content).
CREATE TABLE recon_runs (
    id            BIGINT PRIMARY KEY,
    endpoint      TEXT NOT NULL,
    business_date TEXT NOT NULL,
    file_sha256   TEXT NOT NULL,
    file_name     TEXT NOT NULL,
    lines         BIGINT NOT NULL,
    summary       TEXT NOT NULL,          -- counts per class and totals difference (JSON)
    created_us    BIGINT NOT NULL,
    UNIQUE (endpoint, business_date, file_sha256)
);

-- Every item of a run: a file line, or a journal transaction the file lacks.
CREATE TABLE recon_items (
    run_id        BIGINT NOT NULL,
    seq           BIGINT NOT NULL,
    class         TEXT NOT NULL,
    line          BIGINT,                 -- the file line (1 = first record), when from the file
    txn_id        BIGINT,                 -- the journal transaction, when one is involved
    rrn           TEXT,
    auth_code     TEXT,
    pan_masked    TEXT,
    kind          TEXT,                   -- the file record's type, or the journal row's MTI
    amount_minor  BIGINT,
    journal_amount_minor BIGINT,
    currency      TEXT,
    detail        TEXT,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX recon_items_txn ON recon_items (txn_id);

-- Chargebacks read from clearing files, linked to their original when it is known.
CREATE TABLE chargebacks (
    run_id        BIGINT NOT NULL,
    line          BIGINT NOT NULL,
    endpoint      TEXT NOT NULL,
    rrn           TEXT,
    txn_id        BIGINT,                 -- NULL: original unknown
    amount_minor  BIGINT NOT NULL,
    currency      TEXT,
    reason        TEXT,
    business_date TEXT NOT NULL,
    PRIMARY KEY (run_id, line)
);
CREATE INDEX chargebacks_txn ON chargebacks (txn_id);
