-- Every journal row pays for every index on `transactions`, in the commit the terminal waits for.
-- (terminal_id, stan) is a prefix of transactions_terminal_time, which serves the same look-ups.
DROP INDEX transactions_terminal_stan;
-- Only reversals and advices name an original: the others need no entry.
DROP INDEX transactions_original;
CREATE INDEX transactions_original ON transactions (original_id) WHERE original_id IS NOT NULL;
-- A terminal's batch is looked up by both columns; with batch_number first, the look-up of an
-- original by terminal, STAN and DE7 has one index that starts with terminal_id, and takes it
-- even when the planner has no statistics yet (a new journal, a prepared generic plan).
DROP INDEX transactions_terminal_batch;
CREATE INDEX transactions_batch_terminal ON transactions (batch_number, terminal_id);
