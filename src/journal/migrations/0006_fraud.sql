-- The fraud rules that fired for a transaction, with their reasons ("shadow:" marks rules in
-- shadow mode, which never decline). NULL when none did.
ALTER TABLE transactions ADD COLUMN fraud TEXT;
