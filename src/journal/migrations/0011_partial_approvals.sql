-- A partial approval (DE39 10) charges what the acquirer approved: amount_minor is that amount
-- (the acquirer's DE4), amount_requested_minor what the terminal asked (the request's DE4).
-- Rows written before this column have it empty: they asked what they were charged.
ALTER TABLE transactions ADD COLUMN amount_requested_minor BIGINT;
