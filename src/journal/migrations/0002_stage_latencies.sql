-- Per-stage latencies: decoding, and everything before the acquirer is asked (checks, routing).
ALTER TABLE transactions ADD COLUMN t_decode_us BIGINT;
ALTER TABLE transactions ADD COLUMN t_route_us BIGINT;
