-- Transaction look-up (admin API, `cardswitch txn`): by time, by merchant, and the reversals
-- that name an original. RRN and terminal + STAN are indexed since 0001.
CREATE INDEX transactions_received ON transactions (received_us);
CREATE INDEX transactions_merchant ON transactions (merchant_id, received_us);
CREATE INDEX transactions_original ON transactions (original_id);
