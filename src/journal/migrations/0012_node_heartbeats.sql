-- A running node writes its heartbeat here every few seconds. A node whose heartbeat is older
-- than `switch.takeover_after_ms` and whose lock is free is gone: another node takes over its
-- forwarded requests with no recorded outcome and its duplicate claims left in flight.
ALTER TABLE nodes ADD COLUMN heartbeat_us BIGINT NOT NULL DEFAULT 0;
-- The heartbeat of the death last taken over (NULL: none).
ALTER TABLE nodes ADD COLUMN taken_over_us BIGINT;
