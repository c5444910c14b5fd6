-- Keys received from acquirers in key exchanges, as the HSM encrypted them under its LMK
-- (never in clear), with their check values. The latest per endpoint and kind wins at start.
CREATE TABLE security_keys (
    owner          TEXT   NOT NULL,
    kind           TEXT   NOT NULL,
    key_lmk        TEXT   NOT NULL,
    check_value    TEXT   NOT NULL,
    changed_at_us  BIGINT NOT NULL,
    node           TEXT   NOT NULL,
    PRIMARY KEY (owner, kind)
);
